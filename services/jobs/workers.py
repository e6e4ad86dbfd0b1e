"""Worker heartbeats in the database: how the gateway knows a worker is up, whatever the broker."""

import uuid
from datetime import timedelta
from functools import lru_cache

from sqlalchemy import delete, select, update

from services.config import get_settings
from services.db.models import Job, JobStatus, Worker, utcnow
from services.db.session import session_scope


@lru_cache(maxsize=1)
def _device_name() -> str:
    import torch  # only workers beat; the gateway never loads torch

    return "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def beat(hostname: str) -> None:
    device = _device_name()
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


def live_instances() -> set[str]:
    return {w.hostname for w in live_workers()}


def claim_orphaned_jobs() -> list[tuple[uuid.UUID, str]]:
    """Jobs left ``running`` by a worker instance that stopped beating (killed, lost its machine):
    put them back to ``queued`` and return (id, kind) for the caller to send again. A conditional
    UPDATE makes exactly one claimer win when several workers look at once."""
    stale_s = get_settings().worker_stale_s
    cutoff = utcnow() - timedelta(seconds=stale_s)
    alive = live_instances()
    with session_scope() as s:
        candidates = s.execute(
            select(Job.id, Job.kind, Job.worker).where(
                Job.status == JobStatus.running, Job.updated_at < cutoff
            )
        ).all()
    claimed = []
    for job_id, kind, worker in candidates:
        if worker in alive:
            continue
        with session_scope() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.running, Job.worker == worker)
                .values(
                    status=JobStatus.queued,
                    phase=f"re-queued: worker {worker} stopped answering; resumes from its last checkpoint",
                )
            )
            if result.rowcount == 1:
                claimed.append((job_id, kind))
    return claimed
