"""Task wrappers: each calls one services function (imported lazily: the API never loads torch); and
``enqueue``, which the API calls to queue a job."""

import uuid

from sqlalchemy.orm import Session

from services.db.models import Job
from services.errors import UnavailableError
from services.jobs import store as jobs
from worker.celery_app import celery_app, worker_instance


@celery_app.task(name="ecgssl.pretrain")
def pretrain(job_id: str) -> str:
    from services.jobs.pretrain import run_pretrain_job

    return run_pretrain_job(uuid.UUID(job_id), worker=worker_instance())


@celery_app.task(name="ecgssl.finetune")
def finetune(job_id: str) -> str:
    from services.jobs.finetune import run_finetune_job

    return run_finetune_job(uuid.UUID(job_id), worker=worker_instance())


@celery_app.task(name="ecgssl.evaluate")
def evaluate(job_id: str) -> str:
    from services.jobs.evaluate import run_evaluate_job

    return run_evaluate_job(uuid.UUID(job_id), worker=worker_instance())


@celery_app.task(name="ecgssl.embed_dataset")
def embed_dataset(job_id: str) -> str:
    from services.jobs.export_embeddings import run_embed_dataset_job

    return run_embed_dataset_job(uuid.UUID(job_id), worker=worker_instance())


TASKS = {"pretrain": pretrain, "finetune": finetune, "evaluate": evaluate, "embed_dataset": embed_dataset}


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
