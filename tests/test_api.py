"""The HTTP API in-process, on the real PostgreSQL and Redis of the machine and real ECG records.

Jobs queued here are not run (no worker in this process): the end-to-end tests run them.
"""

import base64
import io
import json
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text

from services.config import get_settings
from services.db.models import Dataset
from services.db.session import session_scope
from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.jobs.workers import beat, forget
from services.models.st_mem import SIZES, StMemEncoder

HR_RECORD = "ptbxl-500/records500/00000/00001_hr"


@pytest.fixture(scope="module")
def tiny_model(registered_tiny_model: tuple[str, StMemEncoder]) -> tuple[str, StMemEncoder]:
    return registered_tiny_model


def wfdb_files(record: Path, *suffixes: str) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (record.with_suffix(s).name, record.with_suffix(s).read_bytes())) for s in suffixes]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def queued_tasks(broker_url: str) -> list[tuple[str, list]]:
    """(task name, args) of the messages waiting on the 'gpu' queue, read from the broker's own storage."""
    if broker_url.startswith("redis"):
        raw = redis.Redis.from_url(broker_url).lrange("gpu", 0, -1)
    else:  # Celery's SQLAlchemy transport keeps messages in a table
        engine = create_engine(broker_url.removeprefix("sqla+"))
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT payload FROM kombu_message WHERE visible")).scalars().all()
        engine.dispose()
    messages = [json.loads(m) for m in raw]
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]


# --------------------------------------------------------------------------------------------------
# docs, jobs


def test_openapi_docs_list_the_endpoints(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in [
        "/jobs/pretrain",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/models",
        "/embed",
        "/health",
    ]:
        assert path in paths, path


def test_pretrain_is_queued_on_the_broker_and_can_be_cancelled(client: TestClient) -> None:
    body = {"dataset": "ptbxl-500", "epochs": 1, "record_limit": 8, "batch_size": 4}
    response = client.post("/jobs/pretrain", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    assert ("ecgssl.pretrain", [job_id]) in queued_tasks(get_settings().broker_url), "not on the 'gpu' queue"

    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued"
    assert job["params"]["dataset"] == "ptbxl-500" and job["progress"]["epochs"] == 1
    assert job["dataset"] == "ptbxl-500"
    with session_scope() as s:
        dataset = s.scalar(select(Dataset).where(Dataset.name == "ptbxl-500"))
        assert (
            dataset.kind == "ptbxl"
            and Path(dataset.path) == (get_settings().data_root / "ptbxl-500").resolve()
        )
    assert any(j["id"] == job_id for j in client.get("/jobs", params={"status": "queued"}).json()["jobs"])

    cancelled = client.post(f"/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"] is True
    again = client.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already finished" in again.json()["detail"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"dataset": "ptbxl-500", "method": "byol"}, "method"),
        ({"dataset": "ptbxl-500", "epochs": -3}, "epochs"),
        ({"dataset": "ptbxl-500", "batch_size": 0}, "batch_size"),
        ({"dataset": "ptbxl-500", "mask_ratio": 1.5}, "mask_ratio"),
        ({"dataset": "ptbxl-500", "model_size": "huge"}, "model_size"),
        ({"dataset": "ptbxl-500", "folds": [11]}, "folds"),
        ({"dataset": "ptbxl-500", "unknown_option": 1}, "unknown_option"),
        ({"epochs": 2}, "dataset"),
        ({"dataset": "../../etc"}, "outside the data root"),
        ({"dataset": "/etc"}, "outside the data root"),
        ({"dataset": "no-such-dataset"}, "does not exist"),
        ({"dataset": "ptbxl-500/LICENSE.txt"}, "not a .npz array file"),
    ],
)
def test_bad_pretrain_requests_get_422_naming_the_problem(
    client: TestClient, body: dict, expected: str
) -> None:
    before = len(client.get("/jobs", params={"limit": 500}).json()["jobs"])
    response = client.post("/jobs/pretrain", json=body)
    assert response.status_code == 422, response.text
    assert expected in response.text
    assert len(client.get("/jobs", params={"limit": 500}).json()["jobs"]) == before, (
        "a rejected job was stored"
    )


def test_malformed_json_and_unknown_jobs(client: TestClient) -> None:
    response = client.post(
        "/jobs/pretrain", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/jobs/not-a-uuid").status_code == 404  # only a UUID routes to a job
    assert client.post(f"/jobs/{uuid.uuid4()}/cancel").status_code == 404


# --------------------------------------------------------------------------------------------------
# embed


def test_embed_ptb_record_matches_pytorch(
    client: TestClient, tiny_model: tuple[str, StMemEncoder], ptb_record: Path
) -> None:
    ref, encoder = tiny_model
    response = client.post(  # fp32: the default serves int8 where it passed (cosine >= 0.999, not 1e-4)
        "/embed",
        params={"model": ref, "precision": "fp32"},
        files=wfdb_files(ptb_record, ".hea", ".dat", ".xyz"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert f"{body['model']}@{body['version']}" == ref
    assert body["dimension"] == SIZES["tiny"].width == len(body["embedding"])
    assert body["record"]["fs"] == 1000 and body["record"]["windows"] == 5
    assert len(body["record"]["channels"]) == 15
    windows = preprocess(read_wfdb(ptb_record), InputSpec())
    with torch.no_grad():
        expected = encoder(torch.from_numpy(windows)).mean(0).numpy()
    np.testing.assert_allclose(body["embedding"], expected, atol=1e-4)


def test_embed_npy_equals_embed_wfdb_of_the_same_record(
    client: TestClient, tiny_model: tuple[str, StMemEncoder], data_dir: Path
) -> None:
    ref, _ = tiny_model
    record = data_dir / HR_RECORD
    from_wfdb = client.post("/embed", params={"model": ref}, files=wfdb_files(record, ".hea", ".dat"))
    signal = read_wfdb(record.with_suffix(".hea")).signal
    from_npy = client.post(
        "/embed",
        params={"model": ref},
        files=[("files", ("ecg.npy", npy_bytes(signal)))],
        data={"fs": "500"},
    )
    assert from_wfdb.status_code == 200 and from_npy.status_code == 200, from_npy.text
    np.testing.assert_allclose(from_npy.json()["embedding"], from_wfdb.json()["embedding"], atol=1e-5)


def test_embed_centre_crop_and_padding(
    client: TestClient, tiny_model: tuple[str, StMemEncoder], data_dir: Path
) -> None:
    ref, _ = tiny_model
    signal = read_wfdb((data_dir / HR_RECORD).with_suffix(".hea")).signal
    files = [("files", ("ecg.npy", npy_bytes(signal)))]
    centre = client.post(
        "/embed", params={"model": ref, "windowing": "center"}, files=files, data={"fs": "500"}
    )
    assert centre.status_code == 200 and centre.json()["record"]["windows"] == 1
    short = [("files", ("short.npy", npy_bytes(signal[:, :2000])))]  # 4 s at 500 Hz, model needs 9 s
    refused = client.post("/embed", params={"model": ref}, files=short, data={"fs": "500"})
    assert refused.status_code == 422 and "shorter than the model's window" in refused.json()["detail"]
    padded = client.post("/embed", params={"model": ref, "pad": "true"}, files=short, data={"fs": "500"})
    assert padded.status_code == 200 and np.isfinite(padded.json()["embedding"]).all()


def _truncated_dat(record: Path) -> list:
    files = wfdb_files(record, ".hea", ".dat")
    name, content = files[1][1]
    return [files[0], ("files", (name, content[: len(content) // 2]))]


def _lying_header(record: Path) -> list:
    files = wfdb_files(record, ".hea", ".dat")
    name, content = files[0][1]
    lines = content.decode().splitlines()
    lines[0] = lines[0].replace(" 5000", " 9000")
    return [("files", (name, "\n".join(lines).encode())), files[1]]


def _npy(array: np.ndarray, name: str = "ecg.npy") -> list:
    return [("files", (name, npy_bytes(array)))]


def _with_nan(record: Path) -> list:
    signal = read_wfdb(record.with_suffix(".hea")).signal.copy()
    signal[6, 100:110] = np.nan
    return _npy(signal)


def _with_inf(record: Path) -> list:
    signal = read_wfdb(record.with_suffix(".hea")).signal.copy()
    signal[0, 5] = np.inf
    return _npy(signal)


BAD_UPLOADS = {
    "text file posing as an ECG": (
        lambda r: [("files", ("notes.txt", b"hello, not an ECG"))],
        {},
        "cannot read",
    ),
    "binary file posing as a header": (
        lambda r: [("files", ("x.hea", os.urandom(512))), ("files", ("x.dat", os.urandom(512)))],
        {},
        "x.hea",
    ),
    "header without its signal file": (lambda r: wfdb_files(r, ".hea"), {}, "00001_hr.dat"),
    "truncated .dat": (_truncated_dat, {}, "00001_hr.hea"),
    "header whose sample count lies": (_lying_header, {}, "00001_hr.hea"),
    "npy without fs": (lambda r: _npy(read_wfdb(r.with_suffix(".hea")).signal), {}, "'fs'"),
    "npy samples x leads": (
        lambda r: _npy(read_wfdb(r.with_suffix(".hea")).signal.T),
        {"fs": "500"},
        "transpose",
    ),
    "npy with NaN": (_with_nan, {"fs": "500"}, "NaN"),
    "npy with inf": (_with_inf, {"fs": "500"}, "lead(s) I"),
    "npy of text": (lambda r: [("files", ("x.npy", b"1,2,3\n4,5,6"))], {"fs": "500"}, "not a NumPy"),
    "zero-length signal": (lambda r: _npy(np.zeros((12, 0), np.float32)), {"fs": "500"}, "no samples"),
    "unknown lead names": (
        lambda r: _npy(read_wfdb(r.with_suffix(".hea")).signal),
        {"fs": "500", "leads": ",".join(f"ch{i}" for i in range(12))},
        "missing lead(s)",
    ),
    "negative fs": (lambda r: _npy(read_wfdb(r.with_suffix(".hea")).signal), {"fs": "-5"}, "fs"),
    "unsafe file name": (lambda r: [("files", ("..hea", b"x"))], {}, "not allowed"),
    "two headers": (lambda r: wfdb_files(r, ".hea") + [("files", ("b.hea", b"b 1 500 10"))], {}, "several"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_4xx_naming_the_problem(
    client: TestClient, tiny_model: tuple[str, StMemEncoder], data_dir: Path, case: str
) -> None:
    make_files, form, expected = BAD_UPLOADS[case]
    leftovers_before = set(Path(tempfile.gettempdir()).glob("ecgssl-upload-*"))
    response = client.post(
        "/embed", params={"model": tiny_model[0]}, files=make_files(data_dir / HR_RECORD), data=form
    )
    assert 400 <= response.status_code < 500, f"{case}: {response.status_code} {response.text}"
    detail = response.json()["detail"]
    assert expected in str(detail), detail
    assert set(Path(tempfile.gettempdir()).glob("ecgssl-upload-*")) == leftovers_before, (
        "upload files left behind"
    )
    assert client.get("/models").status_code == 200  # the server is still serving


def test_upload_over_the_size_limit_is_413(
    client: TestClient,
    tiny_model: tuple[str, StMemEncoder],
    ptb_record: Path,
    settings_env: pytest.MonkeyPatch,
) -> None:
    settings_env.setenv("ECGSSL_UPLOAD_MAX_BYTES", "100000")
    response = client.post(
        "/embed", params={"model": tiny_model[0]}, files=wfdb_files(ptb_record, ".hea", ".dat")
    )
    assert response.status_code == 413 and "100000 bytes" in response.json()["detail"]


def test_model_references(client: TestClient, tiny_model: tuple[str, StMemEncoder], ptb_record: Path) -> None:
    files = wfdb_files(ptb_record, ".hea", ".dat")
    name = tiny_model[0].split("@")[0]
    assert client.post("/embed", params={"model": name}, files=files).status_code == 200
    missing = client.post("/embed", params={"model": "no-such-model"}, files=files)
    assert missing.status_code == 404 and "no-such-model" in missing.json()["detail"]
    assert client.post("/embed", params={"model": f"{name}@99"}, files=files).status_code == 404
    bad = client.post("/embed", params={"model": f"{name}@latest"}, files=files)
    assert bad.status_code == 422 and "must be a number" in bad.json()["detail"]
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    version = listed[name]["versions"][0]
    assert version["embedding_dim"] == 64 and version["input_spec"]["fs"] == 250
    assert version["parity_max_abs_diff"] < 1e-4 and len(version["sha256"]) == 64


# --------------------------------------------------------------------------------------------------
# auth and health


def test_api_key_is_required_for_mutations_when_configured(
    client: TestClient, settings_env: pytest.MonkeyPatch, ptb_record: Path
) -> None:
    settings_env.setenv("ECGSSL_API_KEY", "s3cret")
    body = {"dataset": "ptbxl-500", "epochs": 1}
    assert client.post("/jobs/pretrain", json=body).status_code == 401
    wrong = client.post("/jobs/pretrain", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert client.post("/embed", files=wfdb_files(ptb_record, ".hea", ".dat")).status_code == 401
    assert client.post(f"/jobs/{uuid.uuid4()}/cancel").status_code == 401
    assert client.get("/jobs").status_code == 200  # reading stays open
    ok = client.post("/jobs/pretrain", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 202
    client.post(f"/jobs/{ok.json()['job_id']}/cancel", headers={"Authorization": "Bearer s3cret"})


def test_health_needs_a_live_worker(client: TestClient) -> None:
    without = client.get("/health")
    assert without.status_code == 503
    assert without.json()["database"] == "ok" and without.json()["broker"] == "ok"
    assert without.json()["workers"] == []
    beat("test-worker@here")
    try:
        with_worker = client.get("/health")
        assert with_worker.status_code == 200 and with_worker.json()["status"] == "ok"
        assert with_worker.json()["workers"] == ["test-worker@here (cpu)"]
    finally:
        forget("test-worker@here")


def test_health_reports_an_unreachable_broker(client: TestClient, settings_env: pytest.MonkeyPatch) -> None:
    import worker.celery_app as celery_module

    original = celery_module.celery_app.conf.broker_url
    celery_module.celery_app.conf.broker_url = "redis://127.0.0.1:1/0"
    try:
        response = client.get("/health")
    finally:
        celery_module.celery_app.conf.broker_url = original
    assert response.status_code == 503 and response.json()["broker"].startswith("unreachable")
