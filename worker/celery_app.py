"""The Celery application: training tasks on the ``gpu`` queue, one at a time per worker process."""

import logging
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from services.config import get_settings
from services.workers import beat, forget

settings = get_settings()


def broker_transport_options(broker_url: str) -> dict:
    """Redis redelivers unacknowledged tasks after the visibility timeout: make it outlast any job.

    The SQLAlchemy transport (embedded default) has no such timeout and passes options to its engine.
    """
    if broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        return {"visibility_timeout": settings.visibility_timeout_s}
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
_node: dict[str, str] = {}


@worker_ready.connect
def _start_heartbeat(sender, **_kwargs) -> None:  # noqa: ANN001
    _node["name"] = sender.hostname  # the Celery node name, e.g. worker1@host (-n)

    def loop() -> None:
        while not _stop.is_set():
            try:
                beat(_node["name"])
            except Exception:  # the database may be briefly away; keep beating
                log.exception("worker heartbeat failed")
            _stop.wait(settings.worker_heartbeat_s)

    threading.Thread(target=loop, name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    _stop.set()
    if "name" in _node:
        forget(_node["name"])
