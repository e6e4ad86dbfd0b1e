"""Embedding export jobs through the real service: api and Celery worker on PostgreSQL + Redis, the shipped
model (registered on first start) embedding PTB-XL records; the files downloaded from the job equal what
POST /embed answers for the same records."""

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

from services.datasets.ptbxl import PtbxlDataset
from tests.conftest import needs_servers
from tests.live import Service, dump_logs, wait_for

pytestmark = pytest.mark.e2e

FINISHED = ("succeeded", "failed", "cancelled")
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def export(service: Service, body: dict) -> tuple[dict, np.ndarray, dict]:
    """Run an export job to its end: (the job, embeddings.npy, records.json)."""
    with service.client() as client:
        created = client.post("/jobs/embed", json=body)
        assert created.status_code == 202, created.text
        job = wait_for(client, created.json()["job_id"], lambda j: j["status"] in FINISHED, 300)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(service)}"
        npy = client.get(f"/jobs/{job['id']}/artifacts/embeddings.npy")
        assert npy.status_code == 200 and npy.headers["content-type"] == "application/octet-stream"
        records = client.get(f"/jobs/{job['id']}/artifacts/records.json")
        assert records.status_code == 200 and records.headers["content-type"] == "application/json"
        return job, np.load(io.BytesIO(npy.content)), records.json()


@needs_servers
def test_a_dataset_export_runs_on_the_worker_and_equals_embed(
    production_service: Service, data_dir: Path
) -> None:
    job, embeddings, document = export(
        production_service, {"dataset": "ptbxl-500", "model": "ecg-diagnosis", "record_limit": 16}
    )
    assert job["kind"] == "embed_dataset" and job["progress"]["step"] == job["progress"]["total_steps"] == 16
    expected_files = {"embeddings.npy", "records.json"} | ({"embeddings.parquet"} if HAS_PYARROW else set())
    assert set(job["artifacts"]) == expected_files == set(job["result"]["artifacts"])
    assert job["result"]["model_version"] == document["model_version"] == "ecg-diagnosis@1"
    assert document["variant"] == "fp32" and document["skipped"] == []

    dataset = PtbxlDataset(data_dir / "ptbxl-500")
    assert embeddings.dtype == np.float32 and embeddings.shape == (16, document["embedding_dim"])
    assert np.isfinite(embeddings).all() and (np.linalg.norm(embeddings, axis=1) > 0).all()
    assert [r["row"] for r in document["records"]] == list(range(16))
    assert [r["id"] for r in document["records"]] == [dataset.record_id(i) for i in range(16)]
    assert document["label_names"] == list(dataset.label_names)
    for i, record in enumerate(document["records"]):
        names = [n for n, on in zip(dataset.label_names, dataset.labels[i], strict=True) if on]
        assert record["labels"] == names and record["fold"] == int(dataset.folds[i])
    assert any(r["labels"] for r in document["records"])

    with production_service.client() as client:
        for i in (0, 7, 15):  # a row equals /embed on that record's files, same version and precision
            header = dataset.header_path(i)
            files = [
                ("files", (path.name, path.read_bytes())) for path in (header, header.with_suffix(".dat"))
            ]
            embedded = client.post(
                "/embed", params={"model": "ecg-diagnosis@1", "precision": "fp32"}, files=files
            )
            assert embedded.status_code == 200, embedded.text
            np.testing.assert_allclose(embeddings[i], embedded.json()["embedding"], atol=1e-4)
        if HAS_PYARROW:
            import pyarrow.parquet as pq

            parquet = client.get(f"/jobs/{job['id']}/artifacts/embeddings.parquet")
            assert parquet.status_code == 200
            table = pq.read_table(io.BytesIO(parquet.content)).to_pydict()
            assert table["id"] == [r["id"] for r in document["records"]]
            assert table["labels"] == [r["labels"] for r in document["records"]]
            np.testing.assert_array_equal(np.array(table["embedding"], dtype=np.float32), embeddings)
        assert client.get(f"/jobs/{job['id']}/artifacts/embeddings.csv").status_code == 404
        refused = client.post("/jobs/embed", json={"dataset": "ptbxl-500", "model": "no-such-model"})
        assert refused.status_code == 404 and "no-such-model" in refused.json()["detail"]

    # folds select the records (here: 4 of the test fold)
    job, embeddings, document = export(
        production_service,
        {
            "dataset": "ptbxl-500",
            "model": "ecg-diagnosis@1",
            "folds": [10],
            "record_limit": 4,
            "windowing": "center",
        },
    )
    in_fold = [i for i in range(len(dataset)) if dataset.folds[i] == 10][:4]
    assert embeddings.shape == (4, document["embedding_dim"]) and document["windowing"] == "center"
    assert [r["id"] for r in document["records"]] == [dataset.record_id(i) for i in in_fold]
    assert {r["fold"] for r in document["records"]} == {10} and {
        r["windows"] for r in document["records"]
    } == {1}
