"""The gateway serves ONNX and never loads torch: importing ``api.main`` in a fresh interpreter leaves torch
out of ``sys.modules``, and a gateway on an interpreter where torch cannot be imported at all (as in a
``pip install '.[serve]'`` install) starts, validates job requests from the torch-free family catalogue,
queues jobs and serves /predict and /embed with ONNX Runtime."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a finder that refuses torch as an interpreter without it would (ModuleNotFoundError naming it)
NO_TORCH = textwrap.dedent(
    """
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    """
)


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root (its code is what gets imported)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def gateway_env(tmp_path: Path, ship_default_model: bool) -> dict[str, str]:
    """The test run's settings, on a database and broker of this test's own (SQLite)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGSSL_")}
    env.update(
        ECGSSL_DATABASE_URL=f"sqlite:///{tmp_path / 'gateway.db'}",
        ECGSSL_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        ECGSSL_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        ECGSSL_DATA_ROOT=os.environ.get("ECGSSL_DATA_ROOT", str(ROOT.parent / "shared" / "data")),
        ECGSSL_SHIP_DEFAULT_MODEL=str(ship_default_model).lower(),
    )
    return env


def test_importing_the_gateway_leaves_torch_out(tmp_path: Path) -> None:
    done = run_python(
        "import sys\n"
        "import api.main\n"
        "assert 'torch' not in sys.modules, 'api.main imported torch'\n"
        "assert 'onnxruntime' in sys.modules, 'the gateway serves with onnxruntime'\n"
        "from services.inference import sessions\n"
        "assert sessions.ort.__name__ == 'onnxruntime'\n",
        gateway_env(tmp_path, ship_default_model=False),
    )
    assert done.returncode == 0, done.stderr


def test_a_gateway_without_torch_starts_validates_queues_and_serves(tmp_path: Path) -> None:
    env = gateway_env(tmp_path, ship_default_model=True)
    data_root = Path(env["ECGSSL_DATA_ROOT"])
    record = data_root / "ptbxl-500" / "records500" / "00000" / "00010_hr"
    if not record.with_suffix(".hea").is_file():
        pytest.skip(f"the real ECGs of ../shared/data are not at {data_root}")
    migrated = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert migrated.returncode == 0, migrated.stderr
    code = NO_TORCH + textwrap.dedent(
        f"""
        from pathlib import Path

        from fastapi.testclient import TestClient

        from api.main import app

        record = Path({str(record)!r})
        files = [("files", (p.name, p.read_bytes())) for p in map(record.with_suffix, (".hea", ".dat"))]
        with TestClient(app) as client:  # start-up registers the shipped model (ONNX files, int8 variant)
            health = client.get("/health").json()  # degraded: no worker is live here
            assert health["database"] == "ok" and health["broker"] == "ok", health
            families = client.get("/methods").json()["families"]
            assert [f["name"] for f in families] == ["st_mem", "ecg_jepa", "resnet1d"], families
            # job requests are validated and their recipes filled in from the torch-free catalogue
            job = {{"dataset": "ptbxl-500", "method": "simclr", "model_size": "small"}}
            bad = client.post("/jobs/pretrain", json=job)
            assert bad.status_code == 422 and "does not exist for simclr" in bad.text, bad.text
            job = {{"dataset": "ptbxl-500", "method": "finetune", "family": "resnet1d"}}
            queued = client.post("/jobs/finetune", json=job)
            assert queued.status_code == 202, queued.text
            predicted = client.post("/predict", files=files)
            assert predicted.status_code == 200, predicted.text
            assert predicted.json()["model"] == "ecg-diagnosis", predicted.text
            embedded = client.post("/embed", files=files)
            assert embedded.status_code == 200, embedded.text
            # importing a checkpoint needs torch: refused with a reason, the gateway stays up
            request = {{"format": "st_mem", "path": "x.pth", "name": "x"}}
            imported = client.post("/models/import", json=request)
            assert imported.status_code == 501 and "torch" in imported.json()["detail"], imported.text
        import sys
        assert "torch" not in sys.modules
        """
    )
    done = run_python(code, env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
