"""What the dashboard's Try it page asks of the API: an ECG's leads as read and as preprocessed for a model
(POST /ecg/preview), its nearest reference records (POST /ecg/neighbours); and the dashboard's and the docs'
files, all served from this server."""

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.ecg.preprocess import InputSpec, prepare_signal
from services.ecg.upload import read_upload
from tests.test_api import npy_bytes, wfdb_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped_client(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[TestClient]:
    """The app on a fresh SQLite database where start-up registered the shipped model (with its kNN
    reference set of ptbxl-500 training records)."""
    from services.config import get_settings

    tmp = tmp_path_factory.mktemp("shipped")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ECGSSL_DATABASE_URL", f"sqlite:///{tmp / 'fresh.db'}")
        env.setenv("ECGSSL_ARTIFACT_DIR", str(tmp / "artifacts"))
        env.setenv("ECGSSL_SHIP_DEFAULT_MODEL", "true")
        get_settings.cache_clear()
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, check=True, capture_output=True
        )  # fmt: skip
        from api.main import create_app

        with TestClient(create_app()) as client:
            yield client
    get_settings.cache_clear()


def test_preview_gives_the_leads_as_read_and_through_the_one_preprocessing_path(
    shipped_client: TestClient, ptb_record: Path, tmp_path: Path
) -> None:
    files = wfdb_files(ptb_record, ".hea", ".dat")
    answer = shipped_client.post("/ecg/preview", files=files)
    assert answer.status_code == 200, answer.text
    preview = answer.json()
    assert preview["model"] == "ecg-diagnosis@1" and preview["duration_s"] == 38.4
    assert preview["seconds"] == 10.0
    read, prepared = preview["read"], preview["preprocessed"]
    # as read: the file's 12 standard leads (of its 15 channels) at 1000 Hz, in mV
    recording = read_upload({name: content for _, (name, content) in files}, tmp_path)
    assert read["leads"] == recording.lead_names and len(read["leads"]) == 12
    assert read["fs"] == 1000.0 and read["unit"] == "mV"
    np.testing.assert_allclose(np.array(read["samples"]), recording.signal[:, :10_000], atol=1e-4)
    # as the model sees it: its leads at its 100 Hz, band-passed by services.ecg.preprocess
    spec = InputSpec.from_dict(shipped_client.get("/models/ecg-diagnosis/versions/1").json()["input_spec"])
    assert prepared["leads"] == list(spec.leads) and prepared["fs"] == spec.fs == 100.0
    expected = prepare_signal(recording, spec)[:, :1000]
    np.testing.assert_allclose(np.array(prepared["samples"]), expected, atol=1e-4)

    whole = shipped_client.post("/ecg/preview?seconds=60", files=files).json()
    assert whole["seconds"] == 38.4 and len(whole["preprocessed"]["samples"][0]) == 3840


@pytest.mark.parametrize(
    ("query", "files", "status", "says"),
    [
        ("seconds=0", "wfdb", 422, "greater than 0"),
        ("seconds=61", "wfdb", 422, "less than or equal to 60"),
        ("", "npy", 422, "fs"),  # an array without its sampling rate
        ("model=nobody", "wfdb", 404, "nobody"),
    ],
)
def test_preview_refuses_bad_input_with_what_was_expected(
    shipped_client: TestClient, ptb_record: Path, query: str, files: str, status: int, says: str
) -> None:
    upload = (
        wfdb_files(ptb_record, ".hea", ".dat")
        if files == "wfdb"
        else [("files", ("x.npy", npy_bytes(np.zeros((12, 1000), np.float32))))]
    )
    answer = shipped_client.post(f"/ecg/preview?{query}", files=upload)
    assert answer.status_code == status, answer.text
    assert says in answer.text


def test_neighbours_are_the_records_that_vote_in_predict_knn(
    shipped_client: TestClient, ptb_record: Path
) -> None:
    files = wfdb_files(ptb_record, ".hea", ".dat")
    version = shipped_client.get("/models/ecg-diagnosis/versions/1").json()
    k, classes = version["knn_reference"]["k"], version["knn_reference"]["class_names"]
    answer = shipped_client.post(f"/ecg/neighbours?count={k}", files=files)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["dataset"] == "ptbxl-500" and found["metric"] == "cosine"
    neighbours = found["neighbours"]
    assert len(neighbours) == k and len({n["record_id"] for n in neighbours}) == k
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances) and distances[0] >= 0
    # their labels are the votes /predict?method=knn counts
    votes = shipped_client.post("/predict?method=knn", files=files).json()["probabilities"]
    for name in classes:
        share = sum(name in n["labels"] for n in neighbours) / k
        assert share == pytest.approx(votes[name], abs=1e-6), name
    assert [
        n["record_id"] for n in shipped_client.post("/ecg/neighbours", files=files).json()["neighbours"]
    ] == [n["record_id"] for n in neighbours[:5]]  # fmt: skip  (5 by default, the same order)


def test_neighbours_of_a_model_without_a_reference_set_is_a_409(
    shipped_client: TestClient, ptb_record: Path
) -> None:
    from services.db.session import session_scope
    from services.registry import get_version, register_model_version

    with session_scope() as session:  # the shipped diagnosis model's files, registered without its set
        shipped = get_version(session, "ecg-diagnosis", 1)
        fields = ("onnx_path", "sha256", "input_spec", "embedding_dim", "parity_max_abs_diff", "metrics")
        copied = {name: getattr(shipped, name) for name in fields}
        register_model_version(
            session, name="no-reference", method="finetune", source_job_id=None, **copied,
            variants=shipped.variants, head=shipped.head,
        )  # fmt: skip
    files = wfdb_files(ptb_record, ".hea", ".dat")
    answer = shipped_client.post("/ecg/neighbours?model=no-reference", files=files)
    assert answer.status_code == 409 and "no kNN reference set" in answer.json()["detail"], answer.text


def test_the_dashboard_and_the_docs_load_only_files_of_this_server(shipped_client: TestClient) -> None:
    client = shipped_client
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    # every module the dashboard imports, transitively, is served
    pending, seen = re.findall(r'src="(/assets/[^"]+)"', index.text), set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        asset = client.get(path)
        assert asset.status_code == 200, path
        pending += [f"/assets/{name}" for name in re.findall(r'from "\./([^"]+)"', asset.text)]
    assert {"/assets/app.js", "/assets/charts.js", "/assets/submit.js", "/assets/tryit.js"} <= seen
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        urls = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert urls and all(url.startswith("/") for url in urls), urls
        for url in urls:
            assert client.get(url).status_code == 200, url
    redoc = client.get("/docs-assets/redoc.standalone.js").text
    assert "https://cdn.redoc.ly" not in redoc and "/docs-assets/favicon.png" in redoc
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/ecg/preview", "/ecg/neighbours"}
