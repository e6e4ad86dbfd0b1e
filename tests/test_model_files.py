"""A version's ONNX download (with its sha256) and its model card (Markdown and HTML), on versions made by
real jobs on PTB-XL records (run in-process as the worker runs them) and on the shipped model."""

import hashlib
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

from services.db.models import ModelVersion
from services.db.session import session_scope
from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.registry import resolve_model_version
from services.registry.cards import card_html
from tests.test_downstream import finished

RECORD = "ptbxl-500/records500/00000/00001_hr.hea"


def post_job(client: TestClient, kind: str, body: dict) -> str:
    """Queue a job through the API (the test runs it in-process: ``finished``)."""
    response = client.post(f"/jobs/{kind}", json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


@pytest.fixture(scope="module")
def pretrained(client: TestClient) -> str:
    """A tiny ST-MEM pretrained for one epoch on 24 records by a real pretraining job: its 'name@version'."""
    job_id = post_job(client, "pretrain", {
        "dataset": "ptbxl-500", "epochs": 1, "record_limit": 24, "batch_size": 8, "learning_rate": 1e-3,
        "model_name": f"card-{uuid.uuid4().hex[:6]}",
    })  # fmt: skip
    return finished(client, job_id)["model_version"]


@pytest.fixture(scope="module")
def probed(client: TestClient, pretrained: str) -> dict:
    """A linear probe of it on 100 labelled records (a diagnosis model): the finished job."""
    body = {"model": pretrained, "method": "linear_probe", "dataset": "ptbxl-500", "record_limit": 100,
            "epochs": 2, "batch_size": 16, "knn_k": 5}  # fmt: skip
    return finished(client, post_job(client, "finetune", body))


def version_row(ref: str) -> dict:
    with session_scope() as s:
        v = resolve_model_version(s, ref)
        return {"name": v.model.name, "version": v.version, "sha256": v.sha256, "variants": v.variants,
                "metrics": v.metrics, "parity": v.parity_max_abs_diff, "onnx_path": v.onnx_path}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# ONNX download


def test_the_onnx_file_downloads_with_its_sha256_and_runs_as_registered(
    client: TestClient, registered_tiny_model: tuple, data_dir: Path
) -> None:
    ref, encoder = registered_tiny_model
    row = version_row(ref)
    name, number = row["name"], row["version"]
    response = client.get(f"/models/{name}/versions/{number}/onnx")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{name}-{number}.onnx"' in response.headers["content-disposition"]
    digest = hashlib.sha256(response.content).hexdigest()
    assert digest == row["sha256"] == response.headers["x-content-sha256"]
    assert (
        response.headers["repr-digest"]
        == f"sha-256=:{__import__('base64').b64encode(bytes.fromhex(digest)).decode()}:"
    )
    # the bytes are the registered model: ONNX Runtime on them gives the encoder's embedding
    windows = preprocess(read_wfdb(data_dir / RECORD), InputSpec())
    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    (got,) = session.run(["embedding"], {"signal": windows})
    with torch.no_grad():
        np.testing.assert_allclose(got, encoder(torch.from_numpy(windows)).numpy(), atol=1e-4)

    int8 = client.get(f"/models/{name}/versions/{number}/onnx", params={"variant": "int8"})
    assert int8.status_code == 200 and len(int8.content) < len(response.content)
    assert hashlib.sha256(int8.content).hexdigest() == row["variants"]["int8"]["sha256"]
    assert int8.headers["x-content-sha256"] == row["variants"]["int8"]["sha256"]
    assert f'filename="{name}-{number}.int8.onnx"' in int8.headers["content-disposition"]

    if "fp16" not in row["variants"]:  # made only where ONNX Runtime has CUDA
        missing = client.get(f"/models/{name}/versions/{number}/onnx", params={"variant": "fp16"})
        assert missing.status_code == 404
        assert "no fp16 variant (its ONNX files: fp32, int8)" in missing.json()["detail"]
    unknown = client.get(f"/models/{name}/versions/{number}/onnx", params={"variant": "bf16"})
    assert unknown.status_code == 422 and "fp32" in json.dumps(unknown.json())
    assert client.get(f"/models/{name}/versions/99/onnx").status_code == 404
    assert client.get("/models/no-such-model/versions/1/onnx").status_code == 404


# --------------------------------------------------------------------------------------------------
# model cards


def sections(card: str) -> list[str]:
    return re.findall(r"^## (.+)$", card, flags=re.MULTILINE)


def test_the_card_of_a_pretrained_version_lists_its_data_recipe_run_and_checks(
    client: TestClient, pretrained: str
) -> None:
    row = version_row(pretrained)
    response = client.get(f"/models/{row['name']}/versions/{row['version']}/card")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/markdown")
    card = response.text
    assert card.startswith(f"# Model card: {pretrained}")
    assert sections(card) == [
        "Model", "Training data", "Recipe", "Training run", "Metrics", "Export: parity and variants",
        "Intended use and limitations",
    ]  # fmt: skip
    # the dataset with the records that went in (record_limit 24) and its folds (all)
    assert "| `ptbxl-500` | ptbxl | all | 24 | 24 |" in card
    assert '"record_limit": 24' in card and '"method": "st_mem"' in card and '"epochs": 1' in card
    assert "| device | `cpu` |" in card and re.search(r"\| training time \| \d+\.\d min \|", card)
    assert f"final train loss {row['metrics']['train_loss']:.4f}" in card
    assert "no diagnosis figure" in card  # a pretrained encoder has none until it is evaluated
    assert row["sha256"] in card and f"{row['parity']:.2e} (bound 0.001, passed)" in card
    int8 = row["variants"]["int8"]
    assert f"| int8 | {int8['status']} | {int8['cosine_min']:.6f} |" in card
    assert "Not a medical device" in card
    assert "| aliases | `production` |" in card  # the first version of its model


def test_the_card_of_a_diagnosis_model_gives_its_split_and_metrics_per_class(
    client: TestClient, probed: dict
) -> None:
    ref = probed["model_version"]
    row = version_row(ref)
    card = client.get(f"/models/{row['name']}/versions/{row['version']}/card").text
    records = probed["result"]["records"]
    assert f"| train | 1-8 | {records['train']} |" in card and f"| test | 10 | {records['test']} |" in card
    test = probed["result"]["test"]
    assert f"test macro AUROC **{test['macro_auroc']:.3f}**" in card
    for name, value in test["auroc_per_class"].items():
        assert f"{name} {value:.3f}" in card if value is not None else f"{name} -" in card  # (no positive)
    assert f"kNN (k=5) test macro AUROC {probed['result']['knn']['macro_auroc']:.3f}" in card
    assert '"method": "linear_probe"' in card and "diagnosis head | 5 classes" in card
    assert "| device | `cpu` |" in card

    html = client.get(f"/models/{row['name']}/versions/{row['version']}/card", params={"format": "html"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "<h2>Intended use and limitations</h2>" in html.text and "<table>" in html.text
    assert f"<title>Model card: {ref}</title>" in html.text
    negotiated = client.get(
        f"/models/{row['name']}/versions/{row['version']}/card", headers={"Accept": "text/html"}
    )
    assert negotiated.headers["content-type"].startswith("text/html") and negotiated.text == html.text
    assert client.get(f"/models/{row['name']}/versions/99/card").status_code == 404
    assert client.get(f"/models/{row['name']}/versions/1/card", params={"format": "pdf"}).status_code == 422


def test_html_cards_show_markup_in_the_text_as_text() -> None:
    page = card_html("# Card\n\ndataset `a|b` <script>alert(1)</script> <img src=x onerror=alert(1)>", "<t>")
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<title>&lt;t&gt;</title>" in page


def test_the_shipped_models_card_is_its_own_followed_by_this_registrations_checks(
    settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from api.main import create_app
    from services.registry.shipped import SHIPPED_DIR

    settings_env.setenv("ECGSSL_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    settings_env.setenv("ECGSSL_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    settings_env.setenv("ECGSSL_SHIP_DEFAULT_MODEL", "true")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=root, check=True, capture_output=True
    )
    with TestClient(create_app()) as client:
        card = client.get("/models/ecg-diagnosis/versions/1/card").text
        with session_scope() as s:
            version = s.get(ModelVersion, 1)
            sha256, variants = version.sha256, version.variants
    written = (SHIPPED_DIR / "MODEL_CARD.md").read_text()
    assert card.startswith(written.rstrip())
    own = card[len(written.rstrip()) :]
    assert sections(own) == ["This registration: ecg-diagnosis@1", "Export: parity and variants"]
    assert sha256 in own and f"| int8 | {variants['int8']['status']} |" in own
    for needed in (
        "Training data",
        "Recipe",
        "min on",
        "macro AUROC",
        "Intended use",
        "Not a medical device",
    ):
        assert needed in card, needed
