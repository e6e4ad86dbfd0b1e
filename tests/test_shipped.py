"""The diagnosis model shipped in models/default: small files, registered on first start, serving /predict
and /embed at once, on millivolt and on per-lead z-scored records alike."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.export.onnx import sha256_file
from services.registry.shipped import FILES, MANIFEST, SHIPPED_DIR
from tests.test_api import npy_bytes, wfdb_files

ROOT = Path(__file__).resolve().parents[1]
RECORD = "ptbxl-500/records500/00000/00010_hr"


def test_the_shipped_model_is_a_few_mb_and_matches_its_manifest() -> None:
    sizes = {name: (SHIPPED_DIR / name).stat().st_size for name in (*FILES, MANIFEST, "MODEL_CARD.md")}
    assert sum(sizes.values()) < 8 * 2**20, sizes  # a few MB in the repository
    manifest = json.loads((SHIPPED_DIR / MANIFEST).read_text())
    assert sha256_file(SHIPPED_DIR / "model.onnx") == manifest["sha256"]
    assert manifest["head"]["class_names"] == ["NORM", "MI", "STTC", "CD", "HYP"]
    provenance = manifest["provenance"]
    assert provenance["command"].startswith("reports/default_model.py") and provenance["seed"] == 0
    assert {"recipe", "data", "minutes", "date", "commit"} <= set(provenance)
    card = (SHIPPED_DIR / "MODEL_CARD.md").read_text()
    for needed in ("Intended use", "Not a medical device", "Limitations", "Training data", "macro AUROC"):
        assert needed in card, needed


def test_the_first_start_registers_the_shipped_model_and_serves_predict_at_once(
    settings_env: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path, ptb_record: Path
) -> None:
    settings_env.setenv("ECGSSL_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    settings_env.setenv("ECGSSL_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    settings_env.setenv("ECGSSL_SHIP_DEFAULT_MODEL", "true")
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, check=True, capture_output=True
    )  # fmt: skip  (a fresh database, as on first start)
    from api.main import create_app

    with TestClient(create_app()) as client:  # start-up registers it
        models = client.get("/models").json()["models"]
        assert [m["name"] for m in models] == ["ecg-diagnosis"], models
        assert models[0]["aliases"] == {"production": 1}
        version = client.get("/models/ecg-diagnosis/versions/1").json()
        assert version["variants"]["int8"]["status"] in ("passed", "failed")  # checked here, at registration
        # no model named: the shipped one serves
        mv = client.post("/predict", files=wfdb_files(data_dir / RECORD, ".hea", ".dat"))
        assert mv.status_code == 200, mv.text
        assert mv.json()["model"] == "ecg-diagnosis" and mv.json()["version"] == 1
        # the same record as public preprocessed sets ship it: band-passed, z-scored per lead, no mV
        from services.ecg.readers import read_wfdb

        signal = read_wfdb((data_dir / RECORD).with_suffix(".hea")).signal
        z = (signal - signal.mean(1, keepdims=True)) / signal.std(1, keepdims=True)
        zs = client.post("/predict", files=[("files", ("z.npy", npy_bytes(z)))], data={"fs": "500"})
        assert zs.status_code == 200, zs.text
        p_mv = np.array(list(mv.json()["probabilities"].values()))
        p_z = np.array(list(zs.json()["probabilities"].values()))
        np.testing.assert_allclose(p_z, p_mv, atol=0.03)
        # PTB patient001 (acute myocardial infarction, 1000 Hz, 15 channels): MI rather than NORM
        ptb = client.post("/predict?precision=fp32", files=wfdb_files(ptb_record, ".hea", ".dat", ".xyz"))
        assert ptb.status_code == 200, ptb.text
        p = ptb.json()["probabilities"]
        assert p["MI"] > p["NORM"], p
        embedded = client.post("/embed", files=wfdb_files(ptb_record, ".hea", ".dat"))
        assert embedded.status_code == 200 and embedded.json()["model"] == "ecg-diagnosis"
    with TestClient(create_app()) as client:  # a second start registers nothing more
        assert len(client.get("/models/ecg-diagnosis").json()["versions"]) == 1
