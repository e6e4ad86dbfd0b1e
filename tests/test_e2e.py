"""End to end: uvicorn and a Celery worker as real subprocesses, real broker and database, real ECGs.

1. PostgreSQL + Redis (the production components), worker started as in docker-compose.yml.
2. The embedded default (SQLite + Celery's SQLAlchemy transport), started by the README's run command.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from celery import Celery
from sqlalchemy import create_engine, text

from services.export.onnx import sha256_file
from tests.conftest import ROOT, fresh_postgres_url, fresh_redis_url, needs_servers
from tests.live import (
    TINY_JOB,
    WORKER_COMMAND,
    Service,
    base_env,
    dump_logs,
    migrated,
    start_service,
    stop_process,
    stop_service,
    wait_for,
)

pytestmark = pytest.mark.e2e


def pretrain_then_embed(service: Service, ptb_record: Path, job: dict = TINY_JOB) -> None:
    with service.client() as client:
        created = client.post("/jobs/pretrain", json=job)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        job = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(service)}"
        assert job["progress"]["step"] == job["progress"]["total_steps"] > 0
        assert job["model_version"] is not None

        # the run log, read from the database itself
        engine = create_engine(service.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT epoch, name, value FROM job_metrics WHERE job_id = :id ORDER BY epoch, name"
                    ),
                    {"id": job_id.replace("-", "") if service.database_url.startswith("sqlite") else job_id},
                ).all()
        finally:
            engine.dispose()
        losses = {epoch: value for epoch, name, value in rows if name == "train_loss"}
        assert sorted(losses) == [1, 2], rows
        assert all(np.isfinite(v) and v > 0 for v in losses.values())
        assert {name for _, name, _ in rows} >= {"train_loss", "val_loss", "lr", "samples_per_s"}

        model = job["model_version"]
        files = [
            ("files", (ptb_record.with_suffix(s).name, ptb_record.with_suffix(s).read_bytes()))
            for s in (".hea", ".dat")
        ]
        embedded = client.post("/embed", params={"model": model}, files=files)
        assert embedded.status_code == 200, embedded.text
        body = embedded.json()
        assert f"{body['model']}@{body['version']}" == model
        assert body["dimension"] == 64 == len(body["embedding"])
        assert np.isfinite(body["embedding"]).all() and np.linalg.norm(body["embedding"]) > 0
        assert body["record"]["windows"] == 5

        version = next(
            v for m in client.get("/models").json()["models"] for v in m["versions"] if v["ref"] == model
        )
        assert version["parity_max_abs_diff"] < 1e-3
        assert version["input_spec"]["leads"][0] == "I" and version["input_spec"]["samples"] == 2250


@needs_servers
def test_pretrain_and_embed_on_postgres_and_redis(production_service: Service, ptb_record: Path) -> None:
    pretrain_then_embed(production_service, ptb_record)


@needs_servers
def test_pretrain_on_several_datasets_in_one_job(production_service: Service) -> None:
    """The unlabelled npz (40 records), ptbxl-500 folds 1-2 (30) and a synthetic set (16) in one job: it
    trains on all three, and the job and its version list each with the records that went in."""
    with production_service.client() as client:
        registered = client.post(
            "/datasets", json={"name": "synthetic-16", "kind": "synthetic", "options": {"n": 16, "seed": 3}}
        )
        assert registered.status_code == 201, registered.text
        body = {
            **{k: v for k, v in TINY_JOB.items() if k != "record_limit"},
            "dataset": [
                {"dataset": "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz", "record_limit": 40},
                {"dataset": "ptbxl-500", "folds": [1, 2], "record_limit": 30},
                "synthetic-16",
            ],
            "model_name": "multi-dataset",
        }
        created = client.post("/jobs/pretrain", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        job = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(production_service)}"
        assert job["dataset"] == "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"  # the first entry's row
        assert [m["epoch"] for m in job["metrics"]] == [1, 2]
        assert all(np.isfinite(m["values"]["val_loss"]) for m in job["metrics"])

        expected = [
            # name, kind, folds, record_limit, records (10-s records: one segment each), held out (10 %)
            ("ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz", "npz", None, 40, 40, 4),
            ("ptbxl-500", "ptbxl", [1, 2], 30, 30, 3),
            ("synthetic-16", "synthetic", None, None, 16, 2),
        ]
        for used in (job["datasets"], job["result"]["datasets"]):
            got = [
                (d["name"], d["kind"], d["folds"], d["record_limit"], d["records"], d["val_segments"])
                for d in used
            ]
            assert got == expected, used
            assert [d["segments"] for d in used] == [40, 30, 16] and [d["skipped"] for d in used] == [0, 0, 0]

        version = client.get("/models/multi-dataset/versions/1").json()
        assert f"{version['name']}@{version['version']}" == job["model_version"]
        assert version["metrics"]["datasets"] == job["datasets"]
        assert version["metrics"]["records"] == 86 and version["metrics"]["train_segments"] == 86 - 9
        worker_log = production_service.logs[1].read_text()  # every phase is logged by the worker
        assert f"job {job_id}: preprocessing ptbxl-500 (2/3): 30/30" in worker_log
        assert f"job {job_id}: preprocessing synthetic-16 (3/3): 16/16" in worker_log


@needs_servers
def test_cancel_a_running_job_then_the_worker_takes_the_next(production_service: Service) -> None:
    with production_service.client() as client:
        long_job = {**TINY_JOB, "epochs": 500, "record_limit": 48}
        job_id = client.post("/jobs/pretrain", json=long_job).json()["job_id"]
        wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0, 120)
        requested = time.monotonic()
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        job = wait_for(client, job_id, lambda j: j["status"] != "running", 30)
        assert job["status"] == "cancelled", job
        assert time.monotonic() - requested < 10, "cancel took longer than 10 s"
        assert job["progress"]["epoch"] < 500 and job["model_version"] is None

        next_id = client.post("/jobs/pretrain", json={**TINY_JOB, "epochs": 1}).json()["job_id"]
        done = wait_for(client, next_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
        assert done["status"] == "succeeded", done


@needs_servers
def test_a_job_that_fails_on_the_worker_records_why(production_service: Service) -> None:
    """A dataset that vanished between submission and run: the worker marks the job failed, saying why."""
    job_id = uuid.uuid4()
    engine = create_engine(production_service.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, kind, status, params, epoch, epochs, step, total_steps,"
                    " cancel_requested, created_at, updated_at)"
                    " VALUES (:id, 'pretrain', 'queued', :params, 0, 1, 0, 0, false, now(), now())"
                ),
                {"id": job_id, "params": json.dumps({**TINY_JOB, "dataset": "ptbxl-500-since-removed"})},
            )
    finally:
        engine.dispose()
    broker = Celery(broker=production_service.broker_url)
    broker.send_task("ecgssl.pretrain", args=[str(job_id)], queue="gpu")
    with production_service.client() as client:
        job = wait_for(client, str(job_id), lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 60)
        assert job["status"] == "failed", job
        assert "ptbxl-500-since-removed" in job["error"] and "does not exist" in job["error"], job["error"]
        assert job["finished_at"] is not None


@needs_servers
def test_a_job_survives_its_worker_being_killed(production_service: Service, tmp_path: Path) -> None:
    """SIGKILL the worker mid-job, start another: the task is redelivered and resumes from its checkpoint."""
    service = production_service
    with service.client() as client:
        job_id = client.post(
            "/jobs/pretrain", json={**TINY_JOB, "epochs": 12, "checkpoint_every": 1, "model_name": "killed"}
        ).json()["job_id"]
        wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"]["epoch"] >= 3, 120)

        worker = service.processes[1]
        os.killpg(worker.pid, signal.SIGKILL)  # the main process and its pool child, no chance to clean up
        worker.wait()
        killed_at_epoch = client.get(f"/jobs/{job_id}").json()["progress"]["epoch"]
        log = tmp_path / "replacement-worker.log"
        service.logs.append(log)
        service.processes[1] = subprocess.Popen(
            WORKER_COMMAND, cwd=ROOT, env=service.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

        job = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 180)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(service)}"
        assert [m["epoch"] for m in job["metrics"]] == list(range(1, 13)), "epochs not counted exactly once"
        version = next(
            v
            for m in client.get("/models").json()["models"]
            for v in m["versions"]
            if v["ref"] == job["model_version"]
        )
        resumed = version["metrics"]["resumed_from_epoch"]
        assert 1 <= resumed <= killed_at_epoch, (resumed, killed_at_epoch)  # it did not start over


def test_pretrain_and_embed_on_the_embedded_default(embedded_service: Service, ptb_record: Path) -> None:
    """The README quickstart: a synthetic dataset (no download), pretrain, embed a real record."""
    with embedded_service.client() as client:
        registered = client.post(
            "/datasets", json={"name": "synthetic-64", "kind": "synthetic", "options": {"n": 64}}
        )
        assert registered.status_code == 201, registered.text
    job = {"dataset": "synthetic-64", "epochs": 2, "batch_size": 8, "learning_rate": 1e-3}
    pretrain_then_embed(embedded_service, ptb_record, job)


# --------------------------------------------------------------------------------------------------
# drills: a worker dies at a chosen point of a job (tests/kill_switch.py); another takes the job over

DRILL_JOB = {**TINY_JOB, "epochs": 4, "checkpoint_every": 2}
# KILL_AT -> the epoch whose checkpoint the job resumes from (None: it had registered, nothing runs again)
KILL_POINTS = {
    "epoch:3": 2,  # between checkpoints: after epoch 3's metrics were written
    "checkpoint:4": 2,  # while the last checkpoint was written (not renamed yet)
    "export": 4,  # while exporting: trained, the ONNX file written, not registered
    "registered": None,  # registered, the outcome not written yet
}


def worker_command(app: str, embedded: bool) -> list[str]:
    """WORKER_COMMAND of the Celery app ``app``; on the embedded default with the solo pool, as
    ``python -m api --with-worker`` starts it."""
    command = [app if part == "worker.celery_app" else part for part in WORKER_COMMAND]
    return command + ["-P", "solo"] if embedded else command


def start_worker(service: Service, log: Path, command: list[str], **env: str) -> subprocess.Popen:
    service.logs.append(log)
    worker = subprocess.Popen(
        command, cwd=ROOT, env={**service.env, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    service.processes.append(worker)
    return worker


def metric_rows(service: Service, job_id: str) -> list[tuple]:
    """(epoch, name, created_at) of the job's metric rows, read from the database itself."""
    engine = create_engine(service.database_url)
    sqlite = service.database_url.startswith("sqlite")
    try:
        with engine.connect() as conn:
            return [
                tuple(row)
                for row in conn.execute(
                    text("SELECT epoch, name, created_at FROM job_metrics WHERE job_id = :id ORDER BY epoch"),
                    {"id": job_id.replace("-", "") if sqlite else job_id},
                )
            ]
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=[pytest.param("postgresql", marks=needs_servers), "embedded"])
def drill_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> Iterator[Service]:
    """The api alone (each drill starts its workers): on PostgreSQL + Redis, or on the embedded default
    (SQLite + Celery's SQLAlchemy transport)."""
    tmp = tmp_path_factory.mktemp(f"drills-{request.param}")
    embedded = request.param == "embedded"
    if embedded:
        env = base_env(tmp, f"sqlite:///{tmp / 'ecgssl.db'}", f"sqla+sqlite:///{tmp / 'broker.db'}")
        api = [sys.executable, "-m", "api", "--port", "{port}"]
    else:
        env = migrated(base_env(tmp, fresh_postgres_url(), fresh_redis_url()))
        api = [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", "{port}", "--no-migrate"]
    service = start_service(env, [api], tmp, ready=lambda health: health.json()["database"] == "ok")
    service.embedded = embedded
    yield service
    stop_service(service)


@pytest.mark.parametrize("kill_at", list(KILL_POINTS))
def test_a_job_whose_worker_dies_at_any_point_resumes_and_finishes_once(
    drill_service: Service, kill_at: str, tmp_path: Path
) -> None:
    """The job resumes from its last checkpoint on another worker and succeeds: each epoch's metrics once
    (those written after the checkpoint, before the death, written again), one version registered, whose
    ONNX file is the one on disk."""
    service = drill_service
    embedded = service.embedded
    name = f"drill-{kill_at.replace(':', '')}"
    dying = start_worker(
        service, tmp_path / "dying-worker.log", worker_command("tests.kill_switch", embedded), KILL_AT=kill_at
    )
    with service.client() as client:
        created = client.post("/jobs/pretrain", json={**DRILL_JOB, "model_name": name})
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        try:
            dying.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not die at {kill_at}:\n{dump_logs(service)}")
        died = datetime.now(UTC)
        at_death = client.get(f"/jobs/{job_id}").json()
        assert at_death["status"] == "running", at_death

        replacement = start_worker(
            service, tmp_path / "replacement-worker.log", worker_command("worker.celery_app", embedded)
        )
        try:
            job = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
        finally:
            stop_process(replacement)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(service)}"

        rows = metric_rows(service, job_id)
        assert len(rows) == len({(epoch, metric) for epoch, metric, _ in rows}), "a metric recorded twice"
        assert [m["epoch"] for m in job["metrics"]] == [1, 2, 3, 4]
        assert all({"train_loss", "val_loss", "lr"} <= set(m["values"]) for m in job["metrics"])
        versions = client.get(f"/models/{name}").json()["versions"]
        assert [f"{name}@{v['version']}" for v in versions] == [job["model_version"]]  # exactly one
        version = versions[0]

    resumed = KILL_POINTS[kill_at]
    assert version["metrics"]["resumed_from_epoch"] == (0 if resumed is None else resumed)
    if resumed is not None:  # the epochs after the checkpoint ran again: their rows are the new run's
        rewritten = {epoch for epoch, _, created_at in rows if _utc(created_at) > died}
        assert rewritten == set(range(resumed + 1, 5)), (rewritten, resumed)
    onnx_path = Path(service.env["ECGSSL_ARTIFACT_DIR"]) / "jobs" / job_id / "encoder.onnx"
    assert version["sha256"] == sha256_file(onnx_path)  # the registered file is the one on disk
    print(
        f"\n[{'embedded' if embedded else 'postgresql'}] KILL_AT={kill_at}: died at epoch "
        f"{at_death['progress']['epoch']} ({at_death['progress']['phase']}), resumed from "
        f"{version['metrics']['resumed_from_epoch']}, {len(rows)} metric rows, version {job['model_version']}"
    )


def _utc(value: datetime | str) -> datetime:
    """A created_at as the database hands it back (SQLite: a naive string in UTC)."""
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value if value.tzinfo else value.replace(tzinfo=UTC)
