"""Static checks of the deployment files: docker-compose.yml, Dockerfile.gpu, Makefile, pyproject.toml.

No Docker engine is needed: the files are parsed (PyYAML, tomllib, plain text) and their contracts are
asserted, so that a typo in an environment variable or a drifting torch pin fails here, not at deploy time.
"""

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from services.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile.gpu"
MAKEFILE_PATH = ROOT / "Makefile"
PYPROJECT_PATH = ROOT / "pyproject.toml"

APP_SERVICES = ("api", "worker")
ENV_PREFIX = "ECGSSL_"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE_PATH.is_file(), f"{COMPOSE_PATH} is missing"
    data = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(data, dict), "docker-compose.yml does not parse to a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    services = compose.get("services")
    assert isinstance(services, dict), "docker-compose.yml has no 'services' mapping"
    return services


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT_PATH.read_text())


@pytest.fixture(scope="module")
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line, backslash continuations joined, comments dropped."""
    assert DOCKERFILE_PATH.is_file(), f"{DOCKERFILE_PATH} is missing"
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE_PATH.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    out = []
    for line in logical:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command_words(command) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(word) for word in command]


def _volume_mounts(service: dict) -> list[dict]:
    """Each volume entry as {source, target, read_only}, short (src:dst:ro) or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            # the source may hold ':' inside ${VAR:-default}
            match = re.fullmatch(r"(?:(\$\{[^}]*\}[^:]*|[^:]+):)?([^:]+)(?::([\w,]+))?", entry)
            assert match, f"cannot parse volume entry {entry!r}"
            source, target, options = match.group(1) or "", match.group(2), (match.group(3) or "").split(",")
            mounts.append({"source": source, "target": target, "read_only": "ro" in options})
        else:
            mounts.append(
                {
                    "source": str(entry.get("source", "")),
                    "target": str(entry.get("target", "")),
                    "read_only": bool(entry.get("read_only", False)),
                }
            )
    return mounts


def _depends_on(service: dict) -> dict[str, str | None]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: None for name in deps}
    return {name: (spec or {}).get("condition") for name, spec in deps.items()}


def _torch_pin(text: str, where: str) -> str:
    pins = set(re.findall(r"\btorch==([0-9][0-9A-Za-z.+]*)", text))
    assert len(pins) == 1, (
        f"{where}: expected exactly one torch==<version> pin, found {sorted(pins) or 'none'}"
    )
    return pins.pop()


def _pip_install_targets(command: str) -> list[str]:
    """What every `pip install` in a shell command line installs: its positional arguments, plus
    '-r FILE' / '-e PATH' entries (installing from anything but a named pin or the project itself)."""
    takes_value = {
        "-c",
        "--constraint",
        "-i",
        "--index-url",
        "--extra-index-url",
        "-f",
        "--find-links",
        "-t",
        "--target",
        "--prefix",
        "--root",
        "--platform",
        "--python-version",
        "--implementation",
        "--abi",
        "--only-binary",
        "--no-binary",
        "--progress-bar",
        "--src",
        "--upgrade-strategy",
        "--report",
    }
    from_file = {"-r", "--requirement", "-e", "--editable"}
    targets: list[str] = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        words = shlex.split(segment)
        for i, word in enumerate(words):
            if word != "install" or i == 0:
                continue
            if Path(words[i - 1]).name not in ("pip", "pip3"):  # pip install, python -m pip install
                continue
            rest = iter(words[i + 1 :])
            for arg in rest:
                if arg in from_file:
                    targets.append(f"{arg} {next(rest, '')}")
                elif arg in takes_value:
                    next(rest, None)
                elif not arg.startswith("-"):
                    targets.append(arg)
    return targets


def _run_commands(dockerfile_instructions) -> list[str]:
    return [args for instr, args in dockerfile_instructions if instr == "RUN"]


# ---------------------------------------------------------------- compose


def test_compose_has_all_services(services: dict) -> None:
    missing = {"postgres", "redis", "migrate", "api", "worker"} - set(services)
    assert not missing, f"docker-compose.yml lacks services: {sorted(missing)}"


@pytest.mark.parametrize(("name", "probe"), [("postgres", "pg_isready"), ("redis", "redis-cli")])
def test_backing_service_has_healthcheck(services: dict, name: str, probe: str) -> None:
    healthcheck = services.get(name, {}).get("healthcheck")
    assert healthcheck, f"service {name!r} has no healthcheck (depends_on: service_healthy would never pass)"
    test = healthcheck.get("test")
    words = " ".join(_command_words(test))
    assert probe in words, f"service {name!r} healthcheck should use {probe!r}, got {test!r}"


def test_migrate_runs_alembic_upgrade_head(services: dict) -> None:
    migrate = services.get("migrate", {})
    words = _command_words(migrate.get("command"))
    joined = " ".join(words)
    assert "alembic" in words and "upgrade head" in joined, (
        f"migrate should run 'alembic upgrade head', its command is {migrate.get('command')!r}"
    )
    assert _depends_on(migrate).get("postgres") == "service_healthy", (
        "migrate must wait for postgres with condition: service_healthy"
    )
    assert str(migrate.get("restart", "no")) == "no", "migrate is one-off: restart must be 'no'"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_waits_for_backends_and_migration(services: dict, name: str) -> None:
    deps = _depends_on(services.get(name, {}))
    expected = {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    wrong = {dep: deps.get(dep) for dep, cond in expected.items() if deps.get(dep) != cond}
    assert not wrong, f"service {name!r} depends_on conditions are wrong: got {wrong}, expected {expected}"


def test_worker_built_from_dockerfile_gpu(services: dict) -> None:
    build = services.get("worker", {}).get("build")
    assert isinstance(build, dict), f"worker must have a build section naming Dockerfile.gpu, got {build!r}"
    assert Path(str(build.get("dockerfile", "Dockerfile"))).name == "Dockerfile.gpu", (
        f"worker must be built from Dockerfile.gpu, build is {build!r}"
    )
    context = ROOT / str(build.get("context", "."))
    assert (context / build["dockerfile"]).is_file(), (
        f"worker build file {context / build['dockerfile']} missing"
    )


def test_worker_reserves_gpu(services: dict) -> None:
    worker = services.get("worker", {})
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []
    gpu = [d for d in devices if "gpu" in (d.get("capabilities") or [])]
    assert gpu, (
        "worker must reserve a GPU (deploy.resources.reservations.devices with capabilities [gpu]), "
        f"got {devices!r}"
    )
    assert _environment(worker).get("ECGSSL_DEVICE") == "cuda", "worker should run with ECGSSL_DEVICE=cuda"


def test_worker_consumes_gpu_queue(services: dict) -> None:
    words = _command_words(services.get("worker", {}).get("command"))
    queues: list[str] = []
    for i, word in enumerate(words):
        if word in ("-Q", "--queues") and i + 1 < len(words):
            queues += words[i + 1].split(",")
        elif word.startswith("--queues="):
            queues += word.split("=", 1)[1].split(",")
    assert "celery" in words and "worker" in words, f"worker command is not a Celery worker: {words}"
    assert "gpu" in queues, f"worker must consume the 'gpu' queue (-Q gpu), its queues are {queues}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_artifacts_on_named_volume(compose: dict, services: dict, name: str) -> None:
    service = services.get(name, {})
    artifact_dir = _environment(service).get("ECGSSL_ARTIFACT_DIR")
    assert artifact_dir, f"service {name!r} does not set ECGSSL_ARTIFACT_DIR"
    named = set((compose.get("volumes") or {}).keys())
    mounts = [m for m in _volume_mounts(service) if m["target"].rstrip("/") == artifact_dir.rstrip("/")]
    assert mounts, f"service {name!r} mounts nothing at its artifact dir {artifact_dir}"
    assert mounts[0]["source"] in named, (
        f"service {name!r}: {artifact_dir} is mounted from {mounts[0]['source']!r}, "
        f"not a named volume (top-level volumes: {sorted(named)})"
    )
    assert not mounts[0]["read_only"], f"service {name!r}: the artifact volume must be writable"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_data_mounted_read_only(services: dict, name: str) -> None:
    service = services.get(name, {})
    data_root = _environment(service).get("ECGSSL_DATA_ROOT")
    assert data_root, f"service {name!r} does not set ECGSSL_DATA_ROOT"
    mounts = [m for m in _volume_mounts(service) if m["target"].rstrip("/") == data_root.rstrip("/")]
    assert mounts, f"service {name!r} mounts nothing at its data root {data_root}"
    assert mounts[0]["read_only"], f"service {name!r}: the data mount at {data_root} must be read-only (:ro)"


def test_compose_ecgssl_variables_are_settings_fields(services: dict) -> None:
    fields = set(Settings.model_fields)
    unknown = {}
    seen = 0
    for name, service in services.items():
        for var in _environment(service):
            if var.startswith(ENV_PREFIX):
                seen += 1
                if var[len(ENV_PREFIX) :].lower() not in fields:
                    unknown.setdefault(var, []).append(name)
    assert seen, "no ECGSSL_* variable found in docker-compose.yml"
    assert not unknown, (
        f"ECGSSL_* variables that services.config.Settings does not know (typos?): {unknown}; "
        f"known fields: {sorted(fields)}"
    )


def test_api_healthcheck_hits_health(services: dict) -> None:
    api = services.get("api", {})
    words = " ".join(_command_words((api.get("healthcheck") or {}).get("test")))
    assert "/health" in words, f"api healthcheck should request /health, got {words!r}"
    assert "curl" not in words and "wget" not in words, (
        "api healthcheck must not assume curl/wget in the image"
    )


# ---------------------------------------------------------------- Dockerfile.gpu / pins / extras


def test_dockerfile_base_is_cuda(dockerfile_instructions) -> None:
    froms = [args for instr, args in dockerfile_instructions if instr == "FROM"]
    assert froms, "Dockerfile.gpu has no FROM"
    final = froms[-1].split()[0]
    assert final.startswith("nvidia/cuda:"), (
        f"Dockerfile.gpu must be based on an nvidia/cuda image, got {final!r}"
    )


def test_torch_pin_is_the_same_everywhere(pyproject: dict, dockerfile_instructions) -> None:
    deps = pyproject["project"]["optional-dependencies"]["train"]  # torch is the train extra (workers)
    pyproject_pin = _torch_pin("\n".join(deps), "pyproject.toml [project.optional-dependencies] train")
    makefile_pin = _torch_pin(MAKEFILE_PATH.read_text(), "Makefile")
    docker_pin = _torch_pin("\n".join(_run_commands(dockerfile_instructions)), "Dockerfile.gpu RUN lines")
    assert pyproject_pin == makefile_pin == docker_pin, (
        f"torch pins differ: pyproject {pyproject_pin}, Makefile {makefile_pin}, Dockerfile.gpu {docker_pin}"
    )


def test_dockerfile_installs_gpu_extra_from_pyproject(dockerfile_instructions) -> None:
    copied = " ".join(args for instr, args in dockerfile_instructions if instr == "COPY")
    assert "pyproject.toml" in copied, "Dockerfile.gpu must COPY pyproject.toml"
    assert "models/" in copied, "Dockerfile.gpu must COPY models/ (the shipped diagnosis model)"
    targets = [t for run in _run_commands(dockerfile_instructions) for t in _pip_install_targets(run)]
    project = [t for t in targets if t.startswith(".")]
    assert project, f"Dockerfile.gpu must `pip install '.[gpu]'`; it installs {targets}"
    without_gpu = [t for t in project if "gpu" not in re.findall(r"[\w-]+", t.partition("[")[2])]
    assert not without_gpu, (
        f"every install of the project in Dockerfile.gpu must carry the gpu extra ('.[gpu]'): {without_gpu}"
    )


def test_gpu_extra_has_onnxruntime_gpu(pyproject: dict) -> None:
    gpu = pyproject["project"].get("optional-dependencies", {}).get("gpu", [])
    names = [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in gpu]
    assert "onnxruntime-gpu" in names, f"pyproject's 'gpu' extra must contain onnxruntime-gpu, it is {gpu}"


def test_makefile_installs_cpu_dev_extras_from_pyproject() -> None:
    text = MAKEFILE_PATH.read_text()
    assert re.search(r"pip install\b[^\n]*\.\[cpu,dev\]", text), (
        "the Makefile must `pip install` '.[cpu,dev]' (the same pyproject dependency list as the image)"
    )
    assert re.search(r"^\$\(VENV\)/\.installed:.*\bpyproject\.toml\b", text, re.M), (
        "the Makefile install target should depend on pyproject.toml"
    )


def test_dockerfile_installs_no_package_by_name_but_torch(dockerfile_instructions) -> None:
    targets = [t for run in _run_commands(dockerfile_instructions) for t in _pip_install_targets(run)]
    assert targets, "Dockerfile.gpu runs no pip install at all"
    others = [
        t for t in targets if not re.fullmatch(r"torch==\S+", t) and not re.fullmatch(r"\.(\[[\w,-]+\])?", t)
    ]
    assert not others, (
        f"Dockerfile.gpu pip-installs {others} besides torch and '.[extra]': "
        "dependencies belong in pyproject.toml only, so the Makefile and the image cannot drift"
    )


def _stages(dockerfile_instructions) -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions (its FROM first), by its name ('FROM image AS name')."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instr, args in dockerfile_instructions:
        if instr == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instr, args))
    return stages


def _extras(target: str) -> set[str]:
    return set(re.findall(r"[\w-]+", target.partition("[")[2]))


def test_torch_is_a_train_extra_not_a_dependency(pyproject: dict) -> None:
    names = [
        re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in pyproject["project"]["dependencies"]
    ]
    assert "torch" not in names, "torch must not be a base dependency: a gateway installs without it"
    extras = pyproject["project"]["optional-dependencies"]
    assert any(req.startswith("torch==") for req in extras["train"]), extras["train"]
    assert "ecgssl[train]" in extras["dev"], "the dev extra (make install, the tests) must pull in train"


def test_gateway_image_has_no_torch_and_the_worker_image_has_it(
    services: dict, dockerfile_instructions
) -> None:
    stages = _stages(dockerfile_instructions)
    for name in ("api", "migrate"):
        assert services[name]["build"].get("target") == "gateway", f"{name} must be built --target gateway"
    assert services["worker"]["build"].get("target") == "worker", "the worker must be built --target worker"
    assert list(stages)[-1] == "worker", "the worker stage must be the last (the default target)"
    assert "gateway" in stages, f"Dockerfile.gpu needs a 'gateway' stage, it has {list(stages)}"
    assert stages["gateway"][0][1].split()[0].startswith("nvidia/cuda:"), "the gateway serves on CUDA too"
    gateway = [t for run in _run_commands(stages["gateway"]) for t in _pip_install_targets(run)]
    assert gateway, "the gateway stage installs nothing"
    assert not [t for t in gateway if t.startswith("torch")], f"the gateway stage installs torch: {gateway}"
    assert not [t for t in gateway if _extras(t) & {"train", "dev"}], (
        f"the gateway stage installs an extra that pulls in torch: {gateway}"
    )
    gateway_cmd = json.loads([args for instr, args in stages["gateway"] if instr == "CMD"][-1])
    assert gateway_cmd[:3] == ["python", "-m", "api"], gateway_cmd
    worker = [t for run in _run_commands(stages["worker"]) for t in _pip_install_targets(run)]
    assert any(t.startswith("torch==") for t in worker), worker
    assert all("train" in _extras(t) for t in worker if t.startswith(".")), worker


def test_dockerfile_runs_as_non_root_with_settings(dockerfile_instructions) -> None:
    users = [args for instr, args in dockerfile_instructions if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        f"Dockerfile.gpu must switch to a non-root USER, got {users}"
    )
    workdirs = [args for instr, args in dockerfile_instructions if instr == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app", f"WORKDIR should be /app, got {workdirs}"
    env_text = " ".join(args for instr, args in dockerfile_instructions if instr == "ENV")
    for expected in ("ECGSSL_ARTIFACT_DIR=/artifacts", "ECGSSL_DATA_ROOT=/data", "PYTHONUNBUFFERED=1"):
        assert expected in env_text, f"Dockerfile.gpu should set ENV {expected}"


def test_dockerfile_default_cmd_is_gpu_worker(dockerfile_instructions) -> None:
    cmds = [args for instr, args in dockerfile_instructions if instr == "CMD"]
    assert cmds, "Dockerfile.gpu has no CMD"
    cmd = cmds[-1]
    words = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert words[:2] == ["celery", "-A"] and "worker" in words, (
        f"default CMD should be the Celery worker: {words}"
    )
    assert "-Q" in words and words[words.index("-Q") + 1] == "gpu", f"default CMD must consume 'gpu': {words}"
