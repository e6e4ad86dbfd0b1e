"""Task wrappers: each calls one services function (imported lazily: the API never loads torch)."""

import uuid

from worker.celery_app import celery_app


@celery_app.task(name="ecgssl.pretrain", bind=True)
def pretrain(self, job_id: str) -> str:  # noqa: ANN001
    from services.pretraining import run_pretrain_job

    return run_pretrain_job(uuid.UUID(job_id), worker=self.request.hostname or "unknown")
