"""Nothing lost: a job's writes are idempotent (epoch metrics upserted; a resume drops the epochs after its
checkpoint) and wait out a busy database; a cancel is honoured up to the registration, which then writes
nothing; the API answers 503 (Retry-After) for a busy database and /health says when it takes no writes.

Real databases throughout: PostgreSQL and a SQLite file whose write lock another connection holds. The
drills that kill real workers are in test_e2e.py.
"""

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from services.db.models import Dataset, Job, JobMetric, Model, ModelVersion
from services.db.session import get_engine, is_transient, session_scope
from services.jobs.params import FinetuneParams, PretrainParams
from services.jobs.runner import JobReporter, run_job
from services.jobs.store import job_dir
from services.registry import register_model_version
from tests.conftest import PG_ADMIN, SettingsEnv, fresh_postgres_url, needs_servers
from tests.test_db import alembic_config

LOCK_HELD_RETRY_TIMEOUT_S = 0.2  # the SQLite busy timeout of these tests: a held lock outlasts it at once


def migrated(url: str) -> str:
    command.upgrade(alembic_config(url), "head")
    return url


def new_job(kind: str = "pretrain", params: dict | None = None) -> uuid.UUID:
    with session_scope() as s:
        job = Job(kind=kind, params=params or {}, epochs=6)
        s.add(job)
        s.flush()
        return job.id


def metric_rows(job_id: uuid.UUID) -> list[tuple[int, str, float]]:
    with session_scope() as s:
        rows = s.execute(
            select(JobMetric.epoch, JobMetric.name, JobMetric.value)
            .where(JobMetric.job_id == job_id)
            .order_by(JobMetric.epoch, JobMetric.name)
        )
        return [tuple(row) for row in rows]


@pytest.fixture(params=[pytest.param("postgresql", marks=needs_servers), "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path, settings_env: SettingsEnv) -> str:
    """A fresh, migrated database of each backend, made the settings' database for the test."""
    url = fresh_postgres_url() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'ecgssl.db'}"
    settings_env.setenv("ECGSSL_DATABASE_URL", migrated(url))
    return request.param


# --------------------------------------------------------------------------------------------------
# epoch metrics: once per epoch, whatever was written before a resume


def test_epoch_metrics_are_recorded_once_and_a_resume_drops_the_epochs_after_its_checkpoint(
    database: str,
) -> None:
    job_id = new_job()
    reporter = JobReporter(job_id)
    for epoch in range(1, 6):  # the worker dies after epoch 5; its last checkpoint is of epoch 3
        reporter.epoch_metrics(epoch, {"train_loss": 1.0 / epoch, "lr": 0.1})
    reporter.epoch_metrics(1, {"train_loss": 0.5}, prefix="member2_")  # another ensemble member's rows

    history = reporter.resumed_from(3)
    assert history == [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    assert {(e, n) for e, n, _ in metric_rows(job_id)} == {
        *((e, n) for e in (1, 2, 3) for n in ("lr", "train_loss")),
        (1, "member2_train_loss"),
    }
    for epoch in range(4, 7):  # the redelivered job runs epochs 4-6
        reporter.epoch_metrics(epoch, {"train_loss": 2.0 / epoch, "lr": 0.1})
    reporter.epoch_metrics(6, {"train_loss": 0.25, "lr": 0.1})  # an epoch written again: the last value stays

    rows = metric_rows(job_id)
    assert len(rows) == len({(e, n) for e, n, _ in rows}) == 6 * 2 + 1  # each (epoch, name) once
    losses = {e: v for e, n, v in rows if n == "train_loss"}
    assert losses == {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.5, 5: 0.4, 6: 0.25}

    # a member resuming drops only its own rows
    assert JobReporter(job_id).resumed_from(0, prefix="member2_") == []
    assert len(metric_rows(job_id)) == 12


def test_two_writers_of_the_same_epoch_metrics_do_not_collide(database: str) -> None:
    """Concurrent upserts of the same rows (e.g. a duplicate delivery racing the original) never hit the
    unique constraint: one row per (epoch, name), holding one of the values written."""
    job_id = new_job()
    start, errors = threading.Barrier(3), []

    def write(writer: int) -> None:
        reporter = JobReporter(job_id)
        start.wait()
        try:
            for epoch in range(1, 11):
                reporter.epoch_metrics(epoch, {"train_loss": float(writer), "val_loss": float(writer)})
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = metric_rows(job_id)
    assert len(rows) == len({(e, n) for e, n, _ in rows}) == 20
    assert {v for _, _, v in rows} <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("first_use", [True, False], ids=["new name", "registered name"])
def test_jobs_registering_one_name_at_once_get_consecutive_versions(database: str, first_use: bool) -> None:
    """Two jobs finishing together (two workers, e.g. on two GPU machines) publish under one name: each
    registers, with the next number; neither fails on the unique constraint after its training.

    Each registration holds its transaction open a while after writing its row, so the other one reads
    the model's versions before the first commits: the race is there every run, not by chance."""
    name = "race-model"
    fields = {"method": "finetune", "onnx_path": "model.onnx", "sha256": "ab" * 32, "input_spec": {},
              "embedding_dim": 8, "parity_max_abs_diff": 0.0, "metrics": {}, "variants": {}}  # fmt: skip
    if not first_use:
        with session_scope() as s:
            register_model_version(s, name=name, source_job_id=new_job("finetune"), **fields)
    start, refs, errors = threading.Barrier(3), [], []

    def register(job_id: uuid.UUID) -> None:
        def holding(s: Session) -> ModelVersion:
            version = register_model_version(s, name=name, source_job_id=job_id, **fields)
            time.sleep(0.5)  # still uncommitted: the other job registers now
            return version

        start.wait()
        try:
            refs.append(JobReporter(job_id).register_unless_cancelled(holding))
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(new_job("finetune"),)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    first = 1 if first_use else 2
    assert sorted(refs) == [f"{name}@{v}" for v in range(first, first + 3)]
    with session_scope() as s:
        numbers = s.scalars(select(ModelVersion.version).join(Model).where(Model.name == name)).all()
    assert sorted(numbers) == list(range(1, first + 3))


def test_two_jobs_on_one_new_dataset_path_at_once_both_get_its_row(database: str, data_dir: Path) -> None:
    """A dataset path is registered on its first use by a job; two requests using it at once (two users, or
    two processes of a benchmark) both get the one row. The first holds its registration uncommitted while
    the second looks the path up and registers it too: the race is there every run."""
    from services.datasets.registry import dataset_for_job

    path = "ptbxl-500"  # a folder under the data root (data_dir), registered by no one in this database
    found, errors = [], []

    def second() -> None:
        try:
            with session_scope() as s:
                found.append(dataset_for_job(s, path).id)
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    with session_scope() as s:
        first = dataset_for_job(s, path)
        s.flush()
        other = threading.Thread(target=second)
        other.start()
        time.sleep(1.0)  # the second request reads no row (this one is uncommitted) and inserts its own
        first_id = first.id
    other.join(timeout=60)
    assert errors == [] and found == [first_id]
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 1


def test_registering_a_name_another_request_is_registering_is_a_409(database: str, data_dir: Path) -> None:
    """POST /datasets of a name that another request registers at the same moment (still uncommitted when
    this one looks) is refused as taken, once the other commits, not a 500 on the unique constraint."""
    from services.datasets.registry import DatasetRequest, dataset_for_job, register_dataset
    from services.errors import ConflictError

    errors: list[Exception] = []

    def second() -> None:
        try:
            with session_scope() as s:
                register_dataset(s, DatasetRequest(name="ptbxl-500", kind="ptbxl", path="ptbxl-500"))
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    with session_scope() as s:
        dataset_for_job(s, "ptbxl-500")
        s.flush()
        other = threading.Thread(target=second)
        other.start()
        time.sleep(1.0)  # the second request reads no row (this one is uncommitted) and inserts its own
    other.join(timeout=60)
    assert [type(e) for e in errors] == [ConflictError], errors
    assert "a dataset named 'ptbxl-500' is already registered" in str(errors[0])
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 1


# --------------------------------------------------------------------------------------------------
# transient database errors: retried in the job, 503 in the API


class HeldWriteLock:
    """Another process's hold on a SQLite file's write lock (``BEGIN IMMEDIATE`` on its own connection),
    released by a thread once a job write has been seen retrying (``release_after_a_retry``)."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.retried = threading.Event()
        self.retries = 0
        self._releaser: threading.Thread | None = None
        handler = logging.Handler()
        handler.emit = self._saw_log  # type: ignore[method-assign]
        self._handler = handler

    def _saw_log(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1
            self.retried.set()

    def __enter__(self) -> "HeldWriteLock":
        logger = logging.getLogger("services.db.session")
        logger.addHandler(self._handler)
        logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.join()
        logging.getLogger("services.db.session").removeHandler(self._handler)
        self.conn.close()

    def hold(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")

    def release_after_a_retry(self) -> None:
        """Hold the lock now; a thread releases it once a write has failed on it and is retrying."""
        self.hold()
        self.retried.clear()

        def release() -> None:
            self.retried.wait(timeout=120)  # (a limit, should the write never retry: the test then fails)
            self.release()

        self._releaser = threading.Thread(target=release)
        self._releaser.start()

    def join(self) -> None:
        if self._releaser is not None:
            self._releaser.join()
            self._releaser = None

    def while_held(self, write: Callable[[], object]) -> None:
        self.release_after_a_retry()
        write()
        self.join()


@pytest.fixture
def locked_sqlite(tmp_path: Path, settings_env: SettingsEnv) -> Iterator[HeldWriteLock]:
    """The settings' database is a migrated SQLite file with a short busy timeout; the test holds its
    write lock as another process would."""
    path = tmp_path / "ecgssl.db"
    settings_env.setenv("ECGSSL_DATABASE_URL", migrated(f"sqlite:///{path}"))
    settings_env.setenv("ECGSSL_SQLITE_BUSY_TIMEOUT_S", str(LOCK_HELD_RETRY_TIMEOUT_S))
    with HeldWriteLock(path) as lock:
        yield lock


def test_a_job_waits_out_a_write_lock_held_past_the_busy_timeout(locked_sqlite: HeldWriteLock) -> None:
    lock = locked_sqlite
    job_id = new_job()
    lock.hold()
    with pytest.raises(OperationalError, match="database is locked") as plain, session_scope() as s:
        s.get(Job, job_id).phase = "never written"  # a write without retries fails on the lock
    assert is_transient(plain.value)
    lock.release()

    def body(params: dict, reporter: JobReporter) -> dict:
        lock.while_held(lambda: reporter.epoch_metrics(1, {"train_loss": 0.5}))
        lock.while_held(lambda: reporter.phase("written once the lock was released"))
        with session_scope() as s:
            assert s.get(Job, job_id).phase == "written once the lock was released"
        lock.release_after_a_retry()  # held again when the outcome is written
        return {"written": True}

    assert run_job(job_id, "test-worker", body) == "succeeded"
    lock.join()
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.result, job.error) == ("succeeded", {"written": True}, None)
    assert metric_rows(job_id) == [(1, "train_loss", 0.5)]
    assert lock.retries >= 3  # each of the three writes met the lock at least once


def test_a_busy_database_is_a_503_with_retry_after_and_health_says_it_takes_no_writes(
    locked_sqlite: HeldWriteLock,
) -> None:
    from api.main import create_app

    lock = locked_sqlite
    body = {"name": "synthetic-busy", "kind": "synthetic", "options": {"n": 8}}
    with TestClient(create_app()) as client:
        lock.hold()
        try:
            busy = client.post("/datasets", json=body)
            health = client.get("/health")
        finally:
            lock.release()
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "5" and "database is busy" in busy.json()["detail"]
        assert health.status_code == 503
        assert health.json()["database"] == "not writable: database is locked"
        assert client.post("/datasets", json=body).status_code == 201  # released: written
        assert client.get("/health").json()["database"] == "ok"


@needs_servers
def test_health_reports_a_read_only_postgresql_database(settings_env: SettingsEnv) -> None:
    from api.main import create_app

    url = migrated(fresh_postgres_url())
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" SET default_transaction_read_only = on')
    settings_env.setenv("ECGSSL_DATABASE_URL", url)
    get_engine(url).dispose()  # the migration's connections predate the change: new ones are read-only
    with TestClient(create_app()) as client:
        response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["database"] == "not writable: cannot execute DELETE in a read-only transaction"


@needs_servers
def test_transient_database_errors_are_told_apart_from_the_others() -> None:
    unreachable = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(OperationalError) as refused:
        unreachable.connect()
    assert is_transient(refused.value)
    job_id = new_job()
    with pytest.raises(IntegrityError) as duplicate, session_scope() as s:
        s.add_all([JobMetric(job_id=job_id, epoch=1, name="x", value=1.0) for _ in range(2)])
    with pytest.raises(DBAPIError) as missing, session_scope() as s:
        s.execute(text("SELECT * FROM no_such_table"))
    assert not is_transient(duplicate.value) and not is_transient(missing.value)
    assert not is_transient(ValueError("database is locked"))


# --------------------------------------------------------------------------------------------------
# cancel: honoured in every phase; a cancelled job registers nothing


class CancelAt(JobReporter):
    """The job's reporter, requesting the job's cancel through the API when the job reaches ``when``: a
    phase it reports ('preprocessing', 'exporting', ...), or 'registering' (after every cancel check but
    the registration's own)."""

    def __init__(self, job_id: uuid.UUID, client: TestClient, when: str):
        super().__init__(job_id)
        self.client, self.when, self.requested = client, when, False

    def _cancel(self) -> None:
        if not self.requested:
            self.requested = True
            assert self.client.post(f"/jobs/{self.job_id}/cancel").status_code == 200

    def phase(self, text: str) -> None:
        super().phase(text)
        if text.startswith(self.when):
            self._cancel()

    def register_unless_cancelled(self, register: Callable) -> str:
        if self.when == "registering":
            self._cancel()
        return super().register_unless_cancelled(register)


TINY_PRETRAIN = {"dataset": "ptbxl-500", "epochs": 1, "record_limit": 32, "batch_size": 8}
TINY_LINEAR_PROBE = {"dataset": "ptbxl-500", "family": "st_mem", "model_size": "tiny",
                     "method": "linear_probe", "record_limit": 100, "epochs": 1, "knn_k": 5}  # fmt: skip


@pytest.mark.parametrize(
    "kind, when",
    [
        ("pretrain", "preprocessing"),
        ("pretrain", "exporting"),
        ("pretrain", "making and checking the ONNX variants"),
        ("pretrain", "registering"),
        ("finetune", "exporting"),
        ("finetune", "registering"),
    ],
)
def test_a_job_cancelled_in_any_phase_registers_nothing(client: TestClient, kind: str, when: str) -> None:
    from services.jobs.finetune import finetune
    from services.jobs.pretrain import _pretrain

    name = f"cancel-{uuid.uuid4().hex[:8]}"
    body = {**(TINY_PRETRAIN if kind == "pretrain" else TINY_LINEAR_PROBE), "model_name": name}
    if when == "preprocessing":
        body["record_limit"] = 26  # records not cached yet: preprocessed by this job
    created = client.post(f"/jobs/{kind}", json=body)
    assert created.status_code == 202, created.text
    job_id = uuid.UUID(created.json()["job_id"])
    reporter = CancelAt(job_id, client, when)

    def run(raw: dict, _envelope_reporter: JobReporter) -> dict | None:
        if kind == "pretrain":
            return _pretrain(job_id, PretrainParams.model_validate(raw), reporter)
        return finetune(job_id, FinetuneParams.model_validate(raw), reporter)

    assert run_job(job_id, "test-worker", run) == "cancelled"
    assert reporter.requested
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["model_version"] is None, job
    assert job["progress"]["phase"].startswith("cancelled"), job["progress"]
    with session_scope() as s:
        assert s.scalar(select(func.count()).where(ModelVersion.source_job_id == job_id)) == 0
    assert client.get(f"/models/{name}").status_code == 404
    assert sorted(p.name for p in job_dir(job_id).glob("*.onnx")) == []  # nothing left to serve
