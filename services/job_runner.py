"""The envelope every job runs in: claim, run the job's body, record the outcome; and the progress reporter.

``run_job(job_id, worker, body)`` is what each Celery task calls (through ``run_pretrain_job``,
``run_finetune_job``, ``run_evaluate_job``):

- a missing job is dropped, a finished one left alone; a job running on another *live* worker is a
  duplicate delivery and is skipped; a job cancelled while queued ends as cancelled without running;
- otherwise the job is marked running on this worker and ``body(params, reporter)`` runs; its return
  value (a JSON-able dict, or None) is stored as the job's ``result``;
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

from services.config import get_settings
from services.db.models import FINISHED, Job, JobMetric, JobStatus, utcnow
from services.db.session import session_scope
from services.errors import ClientError
from services.training.loop import Cancelled, Progress
from services.workers import live_instances

log = logging.getLogger(__name__)


class JobReporter:
    """Writes a job's progress into the database (throttled) and answers 'was a cancel requested?'."""

    def __init__(self, job_id: uuid.UUID, cancel_poll_s: float = 0.5, writes: bool = True):
        self.job_id = job_id
        self.cancel_poll_s = cancel_poll_s
        self.writes = writes  # False on the torchrun ranks other than 0: one process reports
        self._last_poll = 0.0
        self._cancelled = False

    def update(self, **fields) -> None:
        if not self.writes:
            return
        with session_scope() as s:
            job = s.get(Job, self.job_id)
            for key, value in fields.items():
                setattr(job, key, value)

    def phase(self, text: str) -> None:
        log.info("job %s: %s", self.job_id, text)
        self.update(phase=text[:200])

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
        """One row per metric of the epoch (named ``prefix + name``, e.g. an ensemble's ``member2_``)."""
        with session_scope() as s:
            for name, value in metrics.items():
                s.merge(JobMetric(job_id=self.job_id, epoch=epoch, name=prefix + name, value=float(value)))
            job = s.get(Job, self.job_id)
            job.epoch = epoch
            who = f" ({prefix.rstrip('_')})" if prefix else ""
            loss = metrics["train_loss"]
            job.phase = f"training{who}: epoch {epoch}/{job.epochs} done, train_loss {loss:.4f}"

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_poll >= self.cancel_poll_s:
            self._last_poll = now
            with session_scope() as s:
                self._cancelled = bool(s.get(Job, self.job_id).cancel_requested)
        return self._cancelled

    def check_cancel(self, where: str) -> None:
        """Raise ``Cancelled`` between phases that do not run through the training loop."""
        self._last_poll = 0.0
        if self.should_cancel():
            raise Cancelled(f"cancelled {where}")


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


def run_job(job_id: uuid.UUID, worker: str, body: JobBody) -> str:
    """Run one job to its end and record the outcome; returns the final status (or 'missing', 'duplicate')."""
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
        raw_params = dict(job.params)

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
