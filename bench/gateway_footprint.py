"""The gateway's resident memory and start time, for one or more checkouts side by side.

Per checkout (``label=DIR``), three rounds, the checkouts interleaved within each (so that the load of a
shared machine falls on all alike), medians reported:

1. ``python -c 'import api.main'`` in a fresh interpreter: the import's own time, the process's wall time,
   its peak resident memory (VmHWM) and whether torch got loaded;
2. ``uvicorn api.main:app`` on its own migrated SQLite database (no shipped model): the time from spawn to
   the first answer of ``GET /health`` (503 ``degraded`` counts: no worker runs), then after one
   ``GET /methods`` its resident memory (VmRSS, VmHWM) and whether libtorch is mapped.

    .venv/bin/python bench/gateway_footprint.py before=/path/to/old/checkout after=.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROUNDS = 3
IMPORT = """
import json, sys, time
t = time.perf_counter()
import api.main
dt = time.perf_counter() - t
s = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("Vm")}
print(json.dumps({"import_s": dt, "torch": "torch" in sys.modules, **s}))
"""


def memory_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {
            k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "VmHWM")
        }


def environment(repo: Path, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGSSL_")}
    env.update(
        ECGSSL_DATABASE_URL=f"sqlite:///{scratch / 'db.sqlite'}",
        ECGSSL_BROKER_URL=f"sqla+sqlite:///{scratch / 'broker.db'}",
        ECGSSL_ARTIFACT_DIR=str(scratch / "artifacts"),
        ECGSSL_SHIP_DEFAULT_MODEL="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=repo, env=env, check=True,
                   capture_output=True)  # fmt: skip
    return env


def measure_import(repo: Path, env: dict[str, str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IMPORT], cwd=repo, env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    return {**json.loads(done.stdout.splitlines()[-1]), "process_s": time.perf_counter() - started}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_server(repo: Path, env: dict[str, str]) -> dict:
    port = free_port()
    started = time.perf_counter()
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
            except urllib.error.HTTPError:
                pass  # an answer (503 degraded: no worker)
            except (urllib.error.URLError, ConnectionError):
                if time.perf_counter() - started > 300 or proc.poll() is not None:
                    raise RuntimeError(f"the gateway of {repo} did not answer") from None
                time.sleep(0.05)
                continue
            break
        first = time.perf_counter() - started
        urllib.request.urlopen(f"http://127.0.0.1:{port}/methods", timeout=10).read()
        with open(f"/proc/{proc.pid}/maps") as f:
            torch_mapped = "libtorch" in f.read()
        return {"first_health_s": first, **memory_kib(proc.pid), "libtorch_mapped": torch_mapped}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    repos = {label: Path(path).resolve() for label, _, path in (arg.partition("=") for arg in sys.argv[1:])}
    if not repos:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory(prefix="gateway-footprint-") as tmp:
        envs = {}
        for label, repo in repos.items():
            (Path(tmp) / label).mkdir()
            envs[label] = environment(repo, Path(tmp) / label)
        rows = {label: {"import": [], "server": []} for label in repos}
        for _ in range(ROUNDS):
            for label, repo in repos.items():
                rows[label]["import"].append(measure_import(repo, envs[label]))
                rows[label]["server"].append(measure_server(repo, envs[label]))
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs; medians of {ROUNDS}")
    for label, got in rows.items():
        imports, servers = got["import"], got["server"]

        def med(runs: list[dict], key: str) -> float:
            return statistics.median(run[key] for run in runs)

        print(
            f"{label:>8}: import api.main {med(imports, 'import_s'):.2f} s "
            f"(process {med(imports, 'process_s'):.2f} s), peak RSS {med(imports, 'VmHWM') / 1024:.0f} MiB, "
            f"torch loaded {imports[0]['torch']} | uvicorn: first /health "
            f"{med(servers, 'first_health_s'):.2f} s, "
            f"RSS {med(servers, 'VmRSS') / 1024:.0f} MiB (peak {med(servers, 'VmHWM') / 1024:.0f}), "
            f"libtorch mapped {servers[0]['libtorch_mapped']}"
        )


if __name__ == "__main__":
    main()
