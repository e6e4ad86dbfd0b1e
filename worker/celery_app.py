"""The Celery application: training tasks on the ``gpu`` queue, one at a time per worker process."""

import logging
import os
import threading

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from services.config import get_settings
from services.jobs.workers import beat, claim_orphaned_jobs, forget
from services.observability.logs import JOB_ID, configure_logging

settings = get_settings()


def broker_transport_options(broker_url: str) -> dict:
    """Redis redelivers unacknowledged tasks after the visibility timeout: make it outlast any job.

    The SQLAlchemy transport (embedded default) has no such timeout and passes options to its engine.
    """
    if broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        timeout = settings.visibility_timeout_s
        # sweep for expired unacknowledged messages often enough for the timeout to mean something
        return {
            "visibility_timeout": timeout,
            "unacked_restore_interval": max(1, min(10, timeout // 4)),
            "unacked_restore_throttle": 1 if timeout < 600 else 10,
        }
    return {}


celery_app = Celery("ecgssl", broker=settings.broker_url, include=["worker.tasks"])
celery_app.conf.update(
    task_default_queue="gpu",
    task_routes={"ecgssl.*": {"queue": "gpu"}},
    task_acks_late=True,  # a task lost with its worker is redelivered, not dropped
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,  # a worker holds only the job it runs
    broker_transport_options=broker_transport_options(settings.broker_url),
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,  # job state lives in our database, not in a result backend
    worker_hijack_root_logger=False,
    task_serializer="json",
    accept_content=["json"],
)

log = logging.getLogger(__name__)
_stop = threading.Event()
INSTANCE_ENV = "ECGSSL_WORKER_INSTANCE"


def worker_instance() -> str:
    """This worker process: Celery node name and main process id (set before the pool forks)."""
    return os.environ.get(INSTANCE_ENV, "unknown")


@worker_init.connect
def _name_instance(sender, **_kwargs) -> None:  # noqa: ANN001
    os.environ[INSTANCE_ENV] = f"{sender.hostname}#{os.getpid()}"


@worker_ready.connect
def _start_heartbeat(**_kwargs) -> None:
    """Beat every few seconds; with each beat, re-queue the jobs of workers that stopped beating."""

    def loop() -> None:
        while not _stop.is_set():
            try:
                beat(worker_instance())
                for job_id, kind in claim_orphaned_jobs():
                    log.warning("re-queueing job %s: its worker stopped answering", job_id)
                    celery_app.send_task(f"ecgssl.{kind}", args=[str(job_id)], queue="gpu")
            except Exception:  # the database may be briefly away; keep beating
                log.exception("worker heartbeat failed")
            _stop.wait(settings.worker_heartbeat_s)

    threading.Thread(target=loop, name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    _stop.set()
    forget(worker_instance())


def broker_status() -> str:
    """'ok' when the broker takes a connection (one retry, 2 s), else 'unreachable: ...'."""
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"unreachable: {exc}"


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_kwargs) -> None:
    """The service's log configuration (ECGSSL_LOG_FORMAT) instead of Celery's."""
    configure_logging(loglevel or "INFO")


@worker_process_init.connect
def _serve_metrics(**_kwargs) -> None:
    """``/metrics`` from the process that runs the tasks (the pool child; the worker itself with -P solo)."""
    if settings.worker_metrics_port:
        from services.observability.metrics import start_worker_server

        start_worker_server(settings.worker_metrics_port, worker_instance())


@task_prerun.connect
def _job_id_in_logs(args: tuple | None = None, **_kwargs) -> None:
    JOB_ID.set(str(args[0]) if args else None)


@task_postrun.connect
def _count_run(task=None, retval: object = None, **_kwargs) -> None:  # noqa: ANN001  (a Celery task)
    from services.observability.metrics import JOB_RUNS

    JOB_RUNS.labels(kind=task.name.removeprefix("ecgssl."), outcome=str(retval)).inc()
    JOB_ID.set(None)
