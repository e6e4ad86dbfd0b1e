"""Operating the service: Prometheus metrics of the gateway and the worker, JSON logs with request and job
ids, one log line per epoch, no third-party chatter; and a clean shutdown of ``python -m api --with-worker``.

All on a real service (``python -m api --with-worker``: the gateway and its worker as subprocesses, SQLite and
Celery's SQLAlchemy transport) after a real tiny pretraining job on real ECGs."""

import io
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.conftest import fresh_postgres_url, fresh_redis_url, needs_servers
from tests.live import (
    TINY_JOB,
    WORKER_COMMAND,
    Service,
    base_env,
    dump_logs,
    free_port,
    migrated,
    start_service,
    stop_service,
    wait_for,
)

pytestmark = pytest.mark.e2e

EMBEDDED = [sys.executable, "-m", "api", "--port", "{port}", "--with-worker"]


@dataclass
class Observed:
    service: Service
    worker_metrics: str  # the worker's /metrics URL
    job: dict  # the tiny pretraining job, succeeded
    submitted_at: float  # Unix time just before it was submitted
    embed: httpx.Response  # an /embed of a real record with X-Request-ID 'test-embed-1'


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ptb_record: Path
) -> Iterator[Observed]:
    """The embedded service with JSON logs and worker metrics, after a tiny pretraining job and an /embed."""
    tmp = tmp_path_factory.mktemp("observed")
    env = base_env(tmp, f"sqlite:///{tmp / 'ecgssl.db'}", f"sqla+sqlite:///{tmp / 'broker.db'}")
    port = free_port()
    env.update(ECGSSL_LOG_FORMAT="json", ECGSSL_WORKER_METRICS_PORT=str(port))
    service = start_service(env, [EMBEDDED], tmp)
    try:
        with service.client() as client:
            submitted_at = time.time()
            created = client.post("/jobs/pretrain", json=TINY_JOB)
            assert created.status_code == 202, created.text
            job = wait_for(client, created.json()["job_id"], lambda j: j["status"] in FINISHED, 300)
            assert job["status"] == "succeeded", f"{job}\n{dump_logs(service)}"
            record = [ptb_record.with_suffix(".hea"), ptb_record.with_suffix(".dat")]
            files = [("files", (f.name, f.read_bytes())) for f in record]
            embed = client.post("/embed", files=files, headers={"X-Request-ID": "test-embed-1"})
            assert embed.status_code == 200, embed.text
        yield Observed(service, f"http://127.0.0.1:{port}/metrics", job, submitted_at, embed)
    finally:
        stop_service(service)


FINISHED = ("succeeded", "failed", "cancelled")


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] of a Prometheus text page."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    matching = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    assert len(matching) == 1, f"{name}{labels}: {samples.get(name)}"
    return matching[0]


def json_records(service: Service) -> list[dict]:
    """The JSON log records of the service's processes (lines that are not JSON: Celery's banner, prints)."""
    records = []
    for line in service.logs[0].read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_gateway_metrics_count_requests_batches_sessions_jobs_queue_and_heartbeats(
    observed: Observed,
) -> None:
    job_id = observed.job["id"]
    with observed.service.client() as client:
        assert client.get(f"/jobs/{job_id}").status_code == 200
        assert client.get("/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
        assert client.get("/no/such/route").status_code == 404
    samples = scrape(f"{observed.service.url}/metrics")

    requests = "ecgssl_http_requests_total"
    assert value(samples, requests, method="POST", route="/embed", status="200") == 1
    assert value(samples, requests, method="POST", route="/jobs/pretrain", status="202") == 1
    assert value(samples, requests, method="GET", route="/jobs/{job_id:uuid}", status="200") >= 2  # polls too
    assert value(samples, requests, method="GET", route="/jobs/{job_id:uuid}", status="404") == 1
    assert value(samples, requests, method="GET", route="<unmatched>", status="404") == 1
    assert value(samples, "ecgssl_http_request_duration_seconds_count", method="POST", route="/embed") == 1
    assert value(samples, "ecgssl_http_request_duration_seconds_bucket", method="POST", route="/embed",
                 le="+Inf") == 1  # fmt: skip

    # the /embed of one 38.4-s record: its windows ran through the micro-batcher in at least one run
    windows = observed.embed.json()["record"]["windows"]
    runs = value(samples, "ecgssl_microbatch_items_count")
    assert runs >= 1 and value(samples, "ecgssl_microbatch_windows_sum") == windows
    assert value(samples, "ecgssl_microbatch_wait_seconds_count") >= runs
    assert value(samples, "ecgssl_session_loads_total", variant="int8", device="cpu") == 1
    assert value(samples, "ecgssl_sessions_cached") == 1

    assert value(samples, "ecgssl_jobs", kind="pretrain", status="succeeded") == 1
    assert value(samples, "ecgssl_jobs", kind="pretrain", status="running") == 0
    assert value(samples, "ecgssl_jobs", kind="finetune", status="succeeded") == 0
    assert value(samples, "ecgssl_queue_depth", queue="gpu") == 0
    (beat,) = samples["ecgssl_worker_last_heartbeat_timestamp_seconds"]
    assert beat[0]["worker"].startswith("celery@") and beat[0]["device"] == "cpu"
    assert beat[1] > observed.submitted_at  # it beat while the job ran
    assert "ecgssl_scrape_errors" not in samples  # the run log and the broker both answered


def test_worker_metrics_time_each_epoch_and_count_the_run(observed: Observed) -> None:
    samples = scrape(observed.worker_metrics)
    epochs = TINY_JOB["epochs"]
    assert value(samples, "ecgssl_epoch_duration_seconds_count", kind="pretrain") == epochs
    assert value(samples, "ecgssl_epoch_duration_seconds_sum", kind="pretrain") > 0
    assert value(samples, "ecgssl_worker_job_runs_total", kind="pretrain", outcome="succeeded") == 1
    (beat,) = samples["ecgssl_worker_last_heartbeat_timestamp_seconds"]  # its own only
    assert beat[1] > observed.submitted_at


def test_json_logs_carry_request_and_job_ids(observed: Observed) -> None:
    assert observed.embed.headers["X-Request-ID"] == "test-embed-1"  # echoed
    with observed.service.client() as client:
        generated = client.get("/health").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0  # one made for a request that sent none

    records = json_records(observed.service)
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    embed_lines = [r for r in records if r.get("request_id") == "test-embed-1"]
    assert any("POST /embed" in r["message"] and r["logger"] == "uvicorn.access" for r in embed_lines)
    job_id = observed.job["id"]
    job_lines = [r for r in records if r.get("job_id") == job_id]
    assert any(r["logger"] == "services.jobs.runner" for r in job_lines), "the job's phases carry its id"
    assert all(r.get("job_id") is None for r in records if r["logger"].startswith("uvicorn"))


def test_the_worker_logs_one_line_per_epoch_and_no_third_party_chatter(observed: Observed) -> None:
    records = json_records(observed.service)
    job_id = observed.job["id"]
    epochs = [r for r in records if r["logger"] == "services.epochs"]
    assert [r["job_id"] for r in epochs] == [job_id] * TINY_JOB["epochs"]
    for number, record in enumerate(epochs, 1):
        parts = record["message"].split(" | ")
        assert parts[:3] == [f"job {job_id}", "pretrain", f"epoch {number}/{TINY_JOB['epochs']}"], parts
        assert parts[3].startswith("train_loss ") and parts[4].startswith("val_loss ")
        assert parts[5].endswith(" s") and parts[6].endswith(" samples/s")
    log_text = observed.service.logs[0].read_text()
    # the shipped model's and the job's int8 variants were made (ONNX Runtime's quantiser ran twice)
    assert "Quantization parameters for tensor" not in log_text
    assert "pre-processing before quantization" not in log_text
    assert not [r for r in records if r["logger"].split(".")[0] in ("onnxruntime", "matplotlib", "numba")]


def test_a_pretraining_job_draws_its_loss_curve_titled_with_its_version(observed: Observed) -> None:
    job = observed.job
    assert job["artifacts"] == ["loss_curve.png"] == job["result"]["artifacts"]
    title = job["result"]["figures"]["loss_curve.png"]
    with observed.service.client() as client:
        png = client.get(f"/jobs/{job['id']}/artifacts/loss_curve.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.text["Title"] == title and image.size[0] > 600
    what, rest = title.split("\n")
    epochs = TINY_JOB["epochs"]
    assert what == f"Loss per epoch: st_mem pretraining (tiny, {epochs} epochs) on {job['model_version']}"
    assert re.fullmatch(
        r"ptbxl-500: train \d+ / val [1-9]\d* segments \| final train loss \d+\.\d{4}, val loss \d+\.\d{4}",
        rest,
    ), rest


@needs_servers
def test_a_prefork_worker_on_redis_serves_its_metrics_from_its_pool_process(
    tmp_path: Path, data_dir: Path
) -> None:
    """As docker-compose.yml runs it: api + a prefork Celery worker on PostgreSQL and Redis."""
    env = migrated(base_env(tmp_path, fresh_postgres_url(), fresh_redis_url()))
    port = free_port()
    env["ECGSSL_WORKER_METRICS_PORT"] = str(port)
    api = [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", "{port}", "--no-migrate"]
    service = start_service(env, [api, WORKER_COMMAND], tmp_path)
    try:
        with service.client() as client:
            created = client.post("/jobs/pretrain", json=TINY_JOB)
            assert created.status_code == 202, created.text
            job = wait_for(client, created.json()["job_id"], lambda j: j["status"] in FINISHED, 300)
            assert job["status"] == "succeeded", f"{job}\n{dump_logs(service)}"
        worker = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(worker, "ecgssl_epoch_duration_seconds_count", kind="pretrain") == TINY_JOB["epochs"]
        assert value(worker, "ecgssl_worker_job_runs_total", kind="pretrain", outcome="succeeded") == 1
        gateway = scrape(f"{service.url}/metrics")
        assert value(gateway, "ecgssl_queue_depth", queue="gpu") == 0  # Redis: the queue's list lengths
        assert value(gateway, "ecgssl_jobs", kind="pretrain", status="succeeded") == 1
        assert "ecgssl_scrape_errors" not in gateway
        epoch_lines = [line for line in service.logs[1].read_text().splitlines() if "services.epochs" in line]
        assert len(epoch_lines) == TINY_JOB["epochs"] and all(f"[job {job['id']}]" in x for x in epoch_lines)
    finally:
        stop_service(service)


# --------------------------------------------------------------------------------------------------
# clean shutdown


def session_processes(leader: int) -> list[str]:
    """The processes of ``leader``'s session (it was started with ``start_new_session``), from /proc."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text_ = stat.read_text()
        except OSError:
            continue  # exited while we looked
        fields = text_[text_.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == leader and fields[0] != "Z":
            left.append(f"{stat.parent.name}: {text_[: text_.rindex(')') + 1]}")
    return left


def job_row(database_url: str, job_id: str) -> tuple[str, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return tuple(
                conn.execute(
                    text("SELECT status, epoch FROM jobs WHERE id = :id"), {"id": job_id.replace("-", "")}
                ).one()
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_gateway_and_its_worker_and_the_job_resumes(
    stop: signal.Signals, tmp_path: Path, data_dir: Path
) -> None:
    env = base_env(
        tmp_path, f"sqlite:///{tmp_path / 'ecgssl.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    )
    service = start_service(env, [EMBEDDED], tmp_path)
    api = service.processes[0]
    try:
        with service.client() as client:
            # long enough to outlast the gateway's stop (uvicorn's shutdown, then WORKER_GRACE_S) on a fast
            # CPU, where 60 epochs of it ended within that window
            job = {**TINY_JOB, "epochs": 200, "checkpoint_every": 1}
            created = client.post("/jobs/pretrain", json=job)
            assert created.status_code == 202, created.text
            job_id = created.json()["job_id"]
            # its first epoch done (and checkpointed)
            wait_for(client, job_id, lambda j: bool(j["metrics"]) or j["status"] in FINISHED, 300)
        assert session_processes(api.pid)[1:], "the worker runs beside the gateway"
        os.kill(api.pid, stop)  # the gateway alone, as a service manager or Ctrl-C in its terminal would
        api.wait(timeout=90)
        deadline = time.monotonic() + 30  # (the kernel reaps the last exits asynchronously)
        while session_processes(api.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(api.pid) == [], dump_logs(service)
        status, epoch = job_row(service.database_url, job_id)
        # left to resume (on a quiet machine it may be past its last epoch, exporting, when it is stopped)
        assert status == "running" and 1 <= epoch <= job["epochs"], (status, epoch)
    finally:
        stop_service(service)
    if stop != signal.SIGTERM:
        return
    # started again on the same database and broker: the job resumes from its checkpoint and finishes
    service = start_service(env, [EMBEDDED], tmp_path)
    try:
        with service.client() as client:
            done = wait_for(client, job_id, lambda j: j["status"] in FINISHED, 600)
        assert done["status"] == "succeeded", f"{done}\n{dump_logs(service)}"
        name, version = done["model_version"].split("@")
        with service.client() as client:
            metrics = client.get(f"/models/{name}/versions/{version}").json()["metrics"]
        assert metrics["resumed_from_epoch"] >= 1, metrics  # from its checkpoint, not from the start
    finally:
        stop_service(service)


@needs_servers
def test_queue_depth_counts_the_messages_no_worker_has_taken() -> None:
    from api.metrics import queue_depth
    from worker.celery_app import celery_app

    queue = f"depth-{uuid.uuid4().hex[:8]}"  # a queue of its own on the test run's Redis: no worker reads it
    assert celery_app.conf.broker_url.startswith("redis://")
    assert queue_depth(queue) == 0
    for _ in range(3):
        celery_app.send_task("ecgssl.pretrain", args=[str(uuid.uuid4())], queue=queue)
    try:
        assert queue_depth(queue) == 3
    finally:
        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)
    assert queue_depth(queue) == 0
