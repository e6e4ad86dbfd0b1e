"""The ``ecgssl`` command line, run as a subprocess against a real service (api + Celery worker on SQLite,
with an API key) on real ECGs: a tiny pretraining followed live, jobs, models, promotion, embedding a folder
and a zip in batches, predictions, and the one-line errors."""

import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgssl_client.records import RecordError, find_records
from tests.conftest import ROOT
from tests.live import TINY_JOB, Service, base_env, dump_logs, start_service, stop_service

pytestmark = pytest.mark.e2e

KEY = "cli-test-key"
MODEL = "cli-tiny"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Service]:
    """The README's run command (``python -m api --with-worker``, SQLite) with ECGSSL_API_KEY set."""
    tmp = tmp_path_factory.mktemp("cli")
    env = base_env(tmp, f"sqlite:///{tmp / 'ecgssl.db'}", f"sqla+sqlite:///{tmp / 'broker.db'}")
    env["ECGSSL_API_KEY"] = KEY
    started = start_service(env, [[sys.executable, "-m", "api", "--port", "{port}", "--with-worker"]], tmp)
    yield started
    stop_service(started)


def ecgssl(service: Service, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    """``ecgssl ARGS`` with the service's URL and ``key`` from the environment, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGSSL_")}
    env["ECGSSL_URL"] = service.url
    if key is not None:
        env["ECGSSL_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "ecgssl_client", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return run.stdout


def one_line_error(run: subprocess.CompletedProcess, code: int = 1) -> str:
    """The error of a failed run: exit ``code``, no traceback, one line on stderr starting 'error:'."""
    assert run.returncode == code, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pretrained(service: Service) -> tuple[subprocess.CompletedProcess, dict]:
    """One tiny pretraining, submitted and followed by the CLI: (the run, the job as the API shows it)."""
    args = ["pretrain", "--dataset", TINY_JOB["dataset"], "--epochs", str(TINY_JOB["epochs"])]
    args += ["--batch-size", str(TINY_JOB["batch_size"]), "--lr", str(TINY_JOB["learning_rate"])]
    args += ["--set", f"record_limit={TINY_JOB['record_limit']}", "--name", MODEL, "--follow"]
    run = ecgssl(service, *args)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{dump_logs(service)}"
    with service.client() as client:
        jobs = client.get("/jobs", params={"limit": 5}).json()["jobs"]
    (job,) = [j for j in jobs if j["params"].get("model_name") == MODEL]
    return run, job


def test_pretrain_follow_prints_progress_then_the_summary(pretrained: tuple) -> None:
    run, job = pretrained
    assert job["status"] == "succeeded" and job["model_version"] == f"{MODEL}@1"
    assert job["params"]["record_limit"] == 32 and job["params"]["batch_size"] == 8
    lines = run.stdout.splitlines()
    # progress (not a terminal: a line per status, epoch and phase the poll sees), with the loss and ETA once
    # training runs (the epoch the poll first sees mid-training depends on the machine's speed)
    assert any(
        line.startswith("running: epoch ") and ", step" in line and "loss" in line and "ETA" in line
        for line in lines
    ), run.stdout
    # and every finished epoch once, in order, with its metrics, however short the epoch was against the poll
    done = [line for line in lines if line.startswith("epoch ") and " done: " in line]
    assert [line.split(" done: ")[0] for line in done] == ["epoch 1/2", "epoch 2/2"], run.stdout
    for line, epoch in zip(done, job["metrics"], strict=True):
        assert f"train_loss {epoch['values']['train_loss']:.4g}" in line
        assert f"val_loss {epoch['values']['val_loss']:.4g}" in line
    assert f"succeeded: pretrain job {job['id']}" in run.stdout
    assert f"model version: {MODEL}@1" in lines
    summary = next(line for line in lines if line.startswith("epoch 2: "))
    last = job["metrics"][-1]["values"]
    assert f"train_loss {last['train_loss']:.4g}" in summary and f"val_loss {last['val_loss']:.4g}" in summary
    assert "embedding 64-d" in run.stdout and "int8" in run.stdout


def test_jobs_job_and_cancel(service: Service, pretrained: tuple) -> None:
    _, job = pretrained
    listed = ok(ecgssl(service, "jobs", "--kind", "pretrain", "--status", "succeeded"))
    assert job["id"] in listed and f"{MODEL}@1" in listed and "epoch 2/2" in listed
    assert job["id"] not in ok(ecgssl(service, "jobs", "--status", "failed"))
    assert [j["id"] for j in json.loads(ok(ecgssl(service, "jobs", "--json", "--kind", "evaluate")))] == []

    shown = ok(ecgssl(service, "job", job["id"][:8]))  # a unique prefix names the job
    assert f"succeeded: pretrain job {job['id']}" in shown
    table = [line.split() for line in shown.splitlines()]
    header = [row for row in table if row[:1] == ["epoch"]][-1]  # the table's, after the summary's line
    rows = [row for row in table if row[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"]
    column = header.index("train_loss")
    assert [float(row[column]) for row in rows] == pytest.approx(
        [m["values"]["train_loss"] for m in job["metrics"]], rel=1e-3
    )
    assert json.loads(ok(ecgssl(service, "job", job["id"], "--json")))["model_version"] == f"{MODEL}@1"

    finished = one_line_error(ecgssl(service, "cancel", job["id"]))
    assert "HTTP 409" in finished and "finished" in finished

    # a second job, cancelled at once, then followed to its end: exit 1 (it did not succeed)
    tiny = ["--dataset", "ptbxl-500", "--epochs", "2", "--set", "record_limit=32", "--name", "cancelled"]
    created = json.loads(ok(ecgssl(service, "pretrain", *tiny, "--json")))
    cancelled = ok(ecgssl(service, "cancel", created["job_id"]))
    assert f"pretrain job {created['job_id']} (cancel requested)" in cancelled
    followed = ecgssl(service, "job", created["job_id"], "--follow")
    assert followed.returncode == 1 and f"cancelled: pretrain job {created['job_id']}" in followed.stdout


def test_models_and_promote(service: Service, pretrained: tuple) -> None:
    listed = ok(ecgssl(service, "models"))
    assert any(line.split()[:2] == [MODEL, "st_mem"] for line in listed.splitlines()), listed
    assert "ecg-diagnosis" in listed and "production->1" in listed  # the shipped model

    promoted = ok(ecgssl(service, "promote", MODEL, "1", "--alias", "staging"))
    assert promoted.strip() == f"{MODEL}@staging -> version 1 (new alias)"
    with service.client() as client:
        assert client.get(f"/models/{MODEL}/aliases/staging").json()["version"] == 1
    versions = ok(ecgssl(service, "models", MODEL))
    row = next(line.split() for line in versions.splitlines() if line.split()[:1] == [f"{MODEL}@1"])
    assert row[1:4] == ["production,", "staging", "64"], row  # the first version got 'production' itself

    refused = one_line_error(ecgssl(service, "promote", MODEL, "7"))
    assert "no version 7" in refused and "HTTP 422" in refused


def test_datasets(service: Service) -> None:
    added = ok(ecgssl(service, "datasets", "add", "ptbxl-100", "--kind", "ptbxl", "--path", "ptbxl-500",
                      "--option", "sampling_rate=100"))  # fmt: skip
    assert added.strip().startswith("registered dataset ptbxl-100") and "500 records" in added
    listed = json.loads(ok(ecgssl(service, "datasets", "list", "--json")))
    row = next(d for d in listed if d["name"] == "ptbxl-100")
    assert row["options"] == {"sampling_rate": 100} and row["summary"]["records"] == 500
    again = one_line_error(
        ecgssl(service, "datasets", "add", "ptbxl-100", "--kind", "ptbxl", "--path", "ptbxl-500")
    )
    assert "HTTP 409" in again


@pytest.fixture(scope="module")
def ecg_folder(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """70 real 100 Hz PTB-XL records (over the service's 64 records a request), the 65th again in a
    subfolder (same file names), and a metadata table beside them."""
    folder = tmp_path_factory.mktemp("ecgs")
    source = data_dir / "ptbxl-500" / "records100" / "00000"
    for i in range(1, 71):
        for suffix in (".hea", ".dat"):
            shutil.copy(source / f"{i:05d}_lr{suffix}", folder)
    (folder / "again").mkdir()
    for suffix in (".hea", ".dat"):
        shutil.copy(source / f"00065_lr{suffix}", folder / "again")
    shutil.copy(data_dir / "ptbxl-500" / "scp_statements.csv", folder)
    return folder


def embed_one(service: Service, header: Path, model: str) -> np.ndarray:
    """The record's fp32 embedding from POST /embed, the reference for the CLI's batches."""
    files = [
        ("files", (header.with_suffix(s).name, header.with_suffix(s).read_bytes())) for s in (".hea", ".dat")
    ]
    with service.client() as client:
        answer = client.post(
            "/embed",
            params={"model": model, "precision": "fp32"},
            files=files,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["embedding"], dtype=np.float32)


def test_embed_folder_in_batches_to_npy(
    service: Service, pretrained: tuple, ecg_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb.npy"
    args = ["embed", str(ecg_folder), "--model", f"{MODEL}@1", "--out", str(out), "--precision", "fp32"]
    log = service.logs[0]
    before = len(log.read_text().splitlines())
    said = ok(ecgssl(service, *args, "--batch-records", "100"))
    requests = [
        (line.split('"')[1].split("?")[0], line.split('"')[-1].split()[0])
        for line in log.read_text().splitlines()[before:]
        if '"POST /embed' in line
    ]
    # 71 records, over the service's 64 a request: refused (413), then 64, then 6, then the copy of
    # 00065_lr, whose file names the batch before already had, alone (POST /embed)
    assert requests == [
        ("POST /embed/batch", "413"),
        ("POST /embed/batch", "200"),
        ("POST /embed/batch", "200"),
        ("POST /embed", "200"),
    ], requests
    embeddings = np.load(out)
    meta = json.loads(out.with_suffix(".ids.json").read_text())
    ids = [f"{i:05d}_lr" for i in range(1, 71)] + ["again/00065_lr"]
    assert meta["ids"] == ids and meta["model"] == f"{MODEL}@1" and meta["failed"] == []
    assert embeddings.shape == (71, 64) == (len(ids), meta["dimension"]) and embeddings.dtype == np.float32
    assert f"71 embeddings (64-d, {MODEL}@1)" in said
    np.testing.assert_allclose(
        embeddings[0], embed_one(service, ecg_folder / "00001_lr.hea", MODEL), atol=1e-4
    )
    np.testing.assert_allclose(
        embeddings[69], embed_one(service, ecg_folder / "00070_lr.hea", MODEL), atol=1e-4
    )
    np.testing.assert_allclose(embeddings[70], embeddings[64], atol=1e-4)  # the same record, another batch
    assert np.linalg.norm(embeddings[1] - embeddings[0]) > 1e-3


def test_embed_zip_and_a_file_to_parquet_and_csv(
    service: Service, pretrained: tuple, data_dir: Path, tmp_path: Path
) -> None:
    source = data_dir / "ptbxl-500" / "records500" / "00000"
    archive = tmp_path / "ecgs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in (1, 2, 3):
            for suffix in (".hea", ".dat"):
                z.write(source / f"{i:05d}_hr{suffix}", f"batch/{i:05d}_hr{suffix}")
    ptb = data_dir / "ptb-diagnostic" / "s0010_re.hea"
    parquet = tmp_path / "emb.parquet"
    args = ["--model", MODEL, "--precision", "fp32", "--batch-records", "2"]
    ok(ecgssl(service, "embed", str(archive), str(ptb), "--out", str(parquet), *args))
    frame = pd.read_parquet(parquet)
    assert frame["id"].tolist() == [f"ecgs.zip:batch/{i:05d}_hr" for i in (1, 2, 3)] + ["s0010_re"]
    assert list(frame.columns[1:]) == [f"e{i}" for i in range(64)]
    first = embed_one(service, source / "00001_hr.hea", MODEL)
    np.testing.assert_allclose(frame.iloc[0, 1:].to_numpy(float), first, atol=1e-4)
    np.testing.assert_allclose(frame.iloc[3, 1:].to_numpy(float), embed_one(service, ptb, MODEL), atol=1e-4)

    csv = tmp_path / "emb.csv"
    ok(ecgssl(service, "embed", str(archive), "--out", str(csv), *args))
    table = pd.read_csv(csv)
    assert table["id"].tolist() == frame["id"].tolist()[:3]
    np.testing.assert_allclose(
        table.iloc[:, 1:].to_numpy(float), frame.iloc[:3, 1:].to_numpy(float), atol=1e-5
    )


def test_predict_table_and_csv(service: Service, data_dir: Path, tmp_path: Path) -> None:
    ptb = data_dir / "ptb-diagnostic" / "s0010_re.hea"
    ptbxl = data_dir / "ptbxl-500" / "records100" / "00000" / "00001_lr.hea"
    model = ["--model", "ecg-diagnosis", "--precision", "fp32"]
    out = tmp_path / "predictions.csv"
    ok(ecgssl(service, "predict", str(ptb), str(ptbxl), "--out", str(out), *model))
    frame = pd.read_csv(out)
    assert frame["id"].tolist() == ["s0010_re", "00001_lr"]
    assert list(frame.columns) == ["id", "model", "labels", "NORM", "MI", "STTC", "CD", "HYP"]
    files = [("files", (ptb.with_suffix(s).name, ptb.with_suffix(s).read_bytes())) for s in (".hea", ".dat")]
    with service.client() as client:
        direct = client.post(
            "/predict",
            params={"model": "ecg-diagnosis", "precision": "fp32"},
            files=files,
            headers={"Authorization": f"Bearer {KEY}"},
        ).json()
    row = frame.iloc[0]
    assert row["model"] == "ecg-diagnosis@1" and row["labels"].split(";") == direct["labels"]
    assert "MI" in direct["labels"]  # patient001: an acute myocardial infarction
    for name, p in direct["probabilities"].items():
        assert row[name] == pytest.approx(p, abs=1e-5)

    table = ok(ecgssl(service, "predict", str(ptb), *model))
    line = next(line.split() for line in table.splitlines() if line.strip().startswith("s0010_re"))
    assert line[-5:] == [f"{direct['probabilities'][c]:.3f}" for c in direct["classes"]]


def test_clear_errors(service: Service, pretrained: tuple, data_dir: Path, tmp_path: Path) -> None:
    record = data_dir / "ptbxl-500" / "records100" / "00000" / "00001_lr.hea"
    out = str(tmp_path / "x.npy")

    wrong_key = one_line_error(ecgssl(service, "embed", str(record), "--out", out, key="wrong"))
    assert "API key" in wrong_key and "--api-key" in wrong_key and "HTTP 401" in wrong_key
    flag = one_line_error(ecgssl(service, "--api-key", "wrong", "cancel", str(uuid.uuid4()), key=None))
    assert "HTTP 401" in flag

    unknown = one_line_error(ecgssl(service, "embed", str(record), "--model", "nope", "--out", out))
    assert "model 'nope' is not registered" in unknown and "HTTP 404" in unknown

    bad = tmp_path / "broken.hea"
    bad.write_text("this is not a WFDB header\n")
    refused = one_line_error(ecgssl(service, "embed", str(bad), "--model", MODEL, "--out", out))
    assert "broken.hea" in refused and "HTTP 422" in refused
    assert not Path(out).exists()

    # a bad record among good ones: the good ones are written, the bad one listed, exit 1
    partial = ecgssl(service, "embed", str(bad), str(record), "--model", MODEL, "--out", out)
    assert partial.returncode == 1 and "Traceback" not in partial.stderr
    assert "skipped broken" in partial.stderr
    assert json.loads(Path(out).with_suffix(".ids.json").read_text())["ids"] == ["00001_lr"]

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    usage = ecgssl(service, "embed", str(text), "--out", out)
    assert usage.returncode == 2 and "not an ECG record" in usage.stderr and "Traceback" not in usage.stderr

    invalid = one_line_error(ecgssl(service, "pretrain", "--dataset", "ptbxl-500", "--epochs", "0"))
    assert "epochs" in invalid and "greater than or equal to 1" in invalid and "HTTP 422" in invalid

    down = subprocess.run(
        [sys.executable, "-m", "ecgssl_client", "--url", "http://127.0.0.1:9", "jobs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "cannot reach the service at http://127.0.0.1:9" in one_line_error(down)


def test_find_records(data_dir: Path, tmp_path: Path) -> None:
    """Records in files, folders and zips, without a service."""
    ptb = data_dir / "ptb-diagnostic"
    (record,) = find_records([ptb / "s0010_re.hea", ptb / "s0010_re.dat"])  # the .dat goes with its header
    assert record.id == "s0010_re" and sorted(record.files) == [
        "s0010_re.dat",
        "s0010_re.hea",
        "s0010_re.xyz",
    ]
    assert record.size == sum((ptb / name).stat().st_size for name in record.files)

    folder = data_dir / "ptbxl-500"  # its tables (ptbxl_database.csv, ...) are metadata beside WFDB records
    found = find_records([folder])
    assert len(found) == 1000 and found[0].id == "records100/00000/00001_lr"
    assert all(r.id.startswith("records") for r in found)

    mixed = tmp_path / "mixed"  # a record and, in a subfolder, a zip of two more
    (mixed / "sub").mkdir(parents=True)
    for name in record.files:
        shutil.copy(ptb / name, mixed)
    source = data_dir / "ptbxl-500" / "records100" / "00000"
    with zipfile.ZipFile(mixed / "sub" / "ecgs.zip", "w") as z:
        for name in ("00001_lr.hea", "00001_lr.dat", "00002_lr.hea", "00002_lr.dat"):
            z.write(source / name, f"in/{name}")
    found = find_records([mixed])
    assert [r.id for r in found] == ["s0010_re", "sub/ecgs.zip:in/00001_lr", "sub/ecgs.zip:in/00002_lr"]
    assert found[1].read() == [(n, (source / n).read_bytes()) for n in ("00001_lr.hea", "00001_lr.dat")]

    with pytest.raises(RecordError, match="two records have the id 's0010_re'"):
        find_records([ptb / "s0010_re.hea", ptb])
    with pytest.raises(RecordError, match="not an ECG record"):
        find_records([folder / "LICENSE.txt"])
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip")
    with pytest.raises(RecordError, match="not a readable zip archive"):
        find_records([broken])
