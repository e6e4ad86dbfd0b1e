"""Task wrappers: each calls one services function (imported lazily: the API never loads torch)."""

import uuid

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
