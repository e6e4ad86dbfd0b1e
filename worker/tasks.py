"""Task wrappers: each calls one services function (imported lazily: the API never loads torch); and
``enqueue``, which the API calls to queue a job."""

import uuid

from sqlalchemy.orm import Session

from services import jobs
from services.db.models import Job
from services.errors import UnavailableError
from worker.celery_app import celery_app, worker_instance


@celery_app.task(name="ecgssl.pretrain")
def pretrain(job_id: str) -> str:
    from services.pretraining import run_pretrain_job

    return run_pretrain_job(uuid.UUID(job_id), worker=worker_instance())


@celery_app.task(name="ecgssl.finetune")
def finetune(job_id: str) -> str:
    from services.downstream.finetune import run_finetune_job

    return run_finetune_job(uuid.UUID(job_id), worker=worker_instance())


@celery_app.task(name="ecgssl.evaluate")
def evaluate(job_id: str) -> str:
    from services.downstream.evaluate import run_evaluate_job

    return run_evaluate_job(uuid.UUID(job_id), worker=worker_instance())


TASKS = {"pretrain": pretrain, "finetune": finetune, "evaluate": evaluate}


def enqueue(session: Session, job: Job) -> None:
    """Commit ``job`` (the worker must find its row as soon as the task arrives) and send its task
    (``ecgssl.<kind>``) to the gpu queue. A broker that cannot take it: the job is recorded as failed and
    ``UnavailableError`` says to retry later."""
    session.commit()
    try:
        TASKS[job.kind].apply_async(args=[str(job.id)], queue="gpu")
    except Exception as exc:
        jobs.fail_job(session, job.id, f"could not queue the job: broker unavailable ({exc})")
        session.commit()
        raise UnavailableError(f"broker unavailable: {exc}") from exc
