"""Worker heartbeats in the database: how the gateway knows a worker is up, whatever the broker."""

from datetime import timedelta

from sqlalchemy import delete, select

from services.config import get_settings
from services.db.models import Worker, utcnow
from services.db.session import session_scope


def beat(hostname: str) -> None:
    import torch  # only workers beat; the gateway never loads torch

    device = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with session_scope() as s:
        worker = s.get(Worker, hostname)
        if worker is None:
            s.add(Worker(hostname=hostname, device=device))
        else:
            worker.last_seen, worker.device = utcnow(), device


def forget(hostname: str) -> None:
    with session_scope() as s:
        s.execute(delete(Worker).where(Worker.hostname == hostname))


def live_workers() -> list[Worker]:
    cutoff = utcnow() - timedelta(seconds=get_settings().worker_stale_s)
    with session_scope() as s:
        return list(s.scalars(select(Worker).where(Worker.last_seen >= cutoff)))
