"""The envelope every job runs in: claim, run the job's body, record the outcome; and the progress reporter.

``run_job(job_id, worker, body)`` is what each Celery task calls (through ``run_pretrain_job``,
``run_finetune_job``, ``run_evaluate_job``):

- a missing job is dropped, a finished one left alone; a job running on another *live* worker is a
  duplicate delivery and is skipped; a job cancelled while queued ends as cancelled without running;
- otherwise the job is marked running on this worker and ``body(params, reporter)`` runs; its return
  value (a JSON-able dict, or None) is stored as the job's ``result``;
- every write of the job (claim, progress, epoch metrics, outcome) is retried after a transient database
  error (a lock held past the busy timeout, a dropped connection: ``retry_transient``), so that a busy
  database slows a job down instead of failing it;
- epoch metrics are upserted, and a job resumed from its checkpoint of epoch M drops the rows of the epochs
  after M first (``resumed_from``): a redelivered job records each epoch's metrics once;
- a job's model version is registered in one transaction that first claims the job row, so that a cancel
  that came before it leaves no version, and a redelivered job that had registered finds its version
  (``register_unless_cancelled``);
- the outcome is always recorded: succeeded, cancelled (``Cancelled`` from the loop), or failed with a
  one-line message (``public_error``: a client error's message, the invalid parameters, or the type and
  message of anything else), which the API shows; the traceback goes to the worker log only, and no
  server path is shown (paths under the data root are shown relative to it).
"""

import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, joinedload

from services.config import get_settings
from services.db.models import FINISHED, Job, JobMetric, JobStatus, ModelVersion, utcnow
from services.db.session import conflict_insert, retry_transient, session_scope
from services.errors import ClientError
from services.jobs.workers import live_instances
from services.observability.logs import log_epoch
from services.training.loop import Cancelled, Progress

log = logging.getLogger(__name__)

_MEMBER_PREFIX = re.compile(r"member\d+_")


class JobReporter:
    """Writes a job's progress and epoch metrics into the database, answers 'was a cancel requested?', and
    registers the job's model version unless it was (every database access retried on transient errors)."""

    def __init__(self, job_id: uuid.UUID, cancel_poll_s: float = 0.5, writes: bool = True):
        self.job_id = job_id
        self.cancel_poll_s = cancel_poll_s
        self.writes = writes  # False on the torchrun ranks other than 0: one process reports
        self._last_poll = 0.0
        self._cancelled = False

    def update(self, **fields) -> None:
        if not self.writes:
            return

        def write() -> None:
            with session_scope() as s:
                job = s.get(Job, self.job_id)
                for key, value in fields.items():
                    setattr(job, key, value)

        retry_transient(write, f"job {self.job_id}: update")

    def phase(self, text: str) -> None:
        log.info("job %s: %s", self.job_id, text)
        self.update(phase=text[:200])

    def cancellable_phase(self, text: str) -> None:
        """Report a step of work outside the training loop (e.g. preprocessing progress), then raise
        ``Cancelled`` if a cancel was requested."""
        self.phase(text)
        self.check_cancel(f"while {text}")

    def progress(self, p: Progress) -> None:
        self.update(
            epoch=p.epoch,
            epochs=p.epochs,
            step=p.step,
            total_steps=p.total_steps,
            last_loss=p.loss,
            learning_rate=p.lr,
            samples_per_s=p.samples_per_s,
            eta_s=p.eta_s,
        )

    def epoch_metrics(self, epoch: int, metrics: dict[str, float], prefix: str = "") -> None:
        """One row per metric of the epoch (named ``prefix + name``, e.g. an ensemble's ``member2_``),
        upserted: an epoch run again overwrites its rows."""
        if not self.writes:
            return
        values = {prefix + name: float(value) for name, value in metrics.items()}
        who = f" ({prefix.rstrip('_')})" if prefix else ""

        def write() -> tuple[str, int | None]:
            with session_scope() as s:
                upsert_metrics(s, self.job_id, epoch, values)
                job = s.get(Job, self.job_id)
                job.epoch = epoch
                loss = metrics["train_loss"]
                job.phase = f"training{who}: epoch {epoch}/{job.epochs} done, train_loss {loss:.4f}"
                return job.kind, job.epochs

        kind, epochs = retry_transient(write, f"job {self.job_id}: epoch {epoch} metrics")
        log_epoch(self.job_id, kind, epoch, epochs, values)

    def resumed_from(self, epoch: int, prefix: str = "") -> list[dict[str, float]]:
        """Training resumes from its checkpoint of ``epoch``: the metric rows of ``prefix`` (an ensemble
        member's, '' the job's own) of the later epochs, written before the worker died and about to be
        run again, are deleted; returns the kept ones as history rows ``{"epoch": e, name: value}`` (names
        without the prefix)."""

        def write() -> list[JobMetric]:
            with session_scope() as s:
                rows = s.scalars(
                    select(JobMetric)
                    .where(JobMetric.job_id == self.job_id)
                    .order_by(JobMetric.epoch, JobMetric.name)
                )
                rows = [row for row in rows if metric_prefix(row.name) == prefix]
                stale = [row.id for row in rows if row.epoch > epoch]
                if self.writes and stale:
                    s.execute(delete(JobMetric).where(JobMetric.id.in_(stale)))
                return [row for row in rows if row.epoch <= epoch]

        history: dict[int, dict[str, float]] = {}
        for row in retry_transient(write, f"job {self.job_id}: resuming from epoch {epoch}"):
            history.setdefault(row.epoch, {"epoch": row.epoch})[row.name.removeprefix(prefix)] = row.value
        return list(history.values())

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_poll >= self.cancel_poll_s:
            self._last_poll = now

            def read() -> bool:
                with session_scope() as s:
                    return bool(s.get(Job, self.job_id).cancel_requested)

            self._cancelled = retry_transient(read, f"job {self.job_id}: cancel poll")
        return self._cancelled

    def check_cancel(self, where: str) -> None:
        """Raise ``Cancelled`` between phases that do not run through the training loop."""
        self._last_poll = 0.0
        if self.should_cancel():
            raise Cancelled(f"cancelled {where}")

    def registered_version(self) -> ModelVersion | None:
        """The version this job registered already (its worker died before recording the outcome and the
        task was delivered again), with its model loaded; else None."""

        def read() -> ModelVersion | None:
            with session_scope() as s:
                return s.scalar(
                    select(ModelVersion)
                    .options(joinedload(ModelVersion.model))
                    .where(ModelVersion.source_job_id == self.job_id)
                )

        return retry_transient(read, f"job {self.job_id}: registered version")

    def register_unless_cancelled(self, register: Callable[[Session], ModelVersion]) -> str:
        """``register(session)`` the job's model version, unless a cancel was requested; its 'name@version'.

        One transaction: the job row is claimed first by a conditional UPDATE (``cancel_requested`` still
        false), which takes the row lock (PostgreSQL) or the write lock (SQLite). A cancel committed before
        it means no version is written (``Cancelled``); one that comes later waits for the commit, and the
        job has registered. A version this job registered already (redelivered) is returned as it is."""

        def attempt() -> str:
            with session_scope() as s:
                existing = s.scalar(select(ModelVersion).where(ModelVersion.source_job_id == self.job_id))
                if existing is not None:
                    return existing.ref
                claimed = s.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.cancel_requested.is_(False))
                    .values(phase="registering the model version")
                )
                if claimed.rowcount != 1:
                    raise Cancelled("cancelled before registering")
                return register(s).ref

        log.info("job %s: registering the model version", self.job_id)
        return retry_transient(attempt, f"job {self.job_id}: registering")


def member_prefix(member: int) -> str:
    """The prefix of the metric names of ensemble member ``member`` (2, 3, ...; the first has none)."""
    return f"member{member}_"


def metric_prefix(name: str) -> str:
    """The ensemble member prefix of a metric name ('member2_'), '' for the job's own metrics."""
    match = _MEMBER_PREFIX.match(name)
    return match.group(0) if match else ""


def upsert_metrics(session: Session, job_id: uuid.UUID, epoch: int, values: dict[str, float]) -> None:
    """Insert the epoch's metric rows, or overwrite the values of those already there (one statement, so
    two writers of the same row cannot both insert it)."""
    if not values:
        return
    insert = conflict_insert(session)
    if insert is None:
        raise RuntimeError(f"metrics need PostgreSQL or SQLite, not {session.get_bind().dialect.name}")
    now = utcnow()
    rows = [
        {"job_id": job_id, "epoch": epoch, "name": n, "value": v, "created_at": now}
        for n, v in values.items()
    ]
    statement = insert(JobMetric).values(rows)
    statement = statement.on_conflict_do_update(
        index_elements=["job_id", "epoch", "name"],
        set_={"value": statement.excluded.value, "created_at": statement.excluded.created_at},
    )
    session.execute(statement)


JobBody = Callable[[dict, JobReporter], dict | None]

MAX_ERROR_CHARS = 500
# the folders of an absolute path (not preceded by a word character: 'mV/s' and 'a/b' are left alone)
_ABSOLUTE_DIRS = re.compile(r"(?<![\w.~>-])/(?:[^\s'\"/]+/)+")


def public_error(exc: BaseException) -> str:
    """What a failed job shows through the API: one line, no traceback, no server path (paths under the data
    root relative to it, the artifact folder as '<artifacts>', any other absolute path as its file name)."""
    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()]
        text = f"invalid job parameters: {'; '.join(problems)}"
    elif isinstance(exc, ClientError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc} (the worker log has the traceback)"
    settings = get_settings()
    for folder, shown in ((settings.artifact_dir, "<artifacts>"), (settings.data_root, "")):
        for form in {str(Path(folder)), str(Path(folder).resolve())}:  # (not '/data' inside '/database')
            text = re.sub(
                re.escape(form) + r"(/|(?![\w.-]))",
                lambda m, shown=shown: (f"{shown}/" if shown else "") if m[1] else shown or ".",
                text,
            )
    text = " ".join(_ABSOLUTE_DIRS.sub("", text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _claim(job_id: uuid.UUID, worker: str) -> dict | str:
    """Mark the job running on ``worker`` and return its parameters; or the reason it is not run (its
    status, 'missing', 'duplicate')."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the task", job_id)
            return "missing"
        if job.status in FINISHED:
            return job.status
        if (
            job.status == JobStatus.running
            and job.worker not in (None, worker)
            and job.worker in live_instances()
        ):
            log.info("job %s is running on live worker %s: this delivery is a duplicate", job_id, job.worker)
            return "duplicate"
        if job.cancel_requested:
            job.status, job.finished_at, job.phase = JobStatus.cancelled, utcnow(), "cancelled before start"
            return job.status
        job.status, job.worker, job.started_at, job.error = JobStatus.running, worker, utcnow(), None
        return dict(job.params)


def run_job(job_id: uuid.UUID, worker: str, body: JobBody) -> str:
    """Run one job to its end and record the outcome; returns the final status (or 'missing', 'duplicate')."""
    raw_params = retry_transient(lambda: _claim(job_id, worker), f"job {job_id}: claim")
    if isinstance(raw_params, str):
        return raw_params
    reporter = JobReporter(job_id)
    outcome: dict = {}
    try:
        result = body(raw_params, reporter)
        status, error, phase = JobStatus.succeeded, None, "done"
        if result is not None:
            outcome["result"] = result
    except Cancelled as exc:
        status, error, phase = JobStatus.cancelled, None, str(exc)
    except (ClientError, ValidationError) as exc:
        log.warning("job %s refused: %s", job_id, exc)
        status, error, phase = JobStatus.failed, public_error(exc), "failed"
    except Exception as exc:  # any failure is recorded on the job, never lost; the traceback in the log
        log.exception("job %s failed", job_id)
        status, error, phase = JobStatus.failed, public_error(exc), "failed"
    reporter.update(
        status=status,
        error=error,
        phase=phase,
        finished_at=utcnow(),
        eta_s=0.0 if status == "succeeded" else None,
        **outcome,
    )
    return status
