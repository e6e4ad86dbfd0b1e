"""Jobs: queue (pretraining, fine-tuning, evaluation, embedding export), list, inspect, cancel, and their
artifacts."""

import uuid

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.convertors import UUIDConvertor

from api.deps import db_session, require_api_key
from api.responses import errors
from api.schemas import (
    DatasetUse,
    EpochMetrics,
    EvaluateRequest,
    FinetuneRequest,
    JobCreated,
    JobList,
    JobOut,
    JobProgress,
    PretrainRequest,
)
from services.datasets.registry import dataset_for_job
from services.db.models import Job, JobStatus
from services.jobs import store as jobs
from services.jobs.export_embeddings import EmbedDatasetParams
from services.jobs.store import ARTIFACT_NAME, ARTIFACT_TYPES
from services.registry import resolve_model_version

router = APIRouter(prefix="/jobs", tags=["jobs"])

QUEUE_ERRORS = (400, 401, 422, (503, "the broker is unavailable: the job is recorded as failed; retry later"))
MODEL_NOT_FOUND = (404, "the model the job names is not registered, or has no such version")
JOB_NOT_FOUND = (404, "no job has that id")
# '/jobs/{job_id:uuid}': only a UUID names a job, so '/jobs/pretrain' is no job (GET on it: 405, not a 422)
JobId = PathParam(
    ...,
    description="the job's id (another text: 404)",
    json_schema_extra={"pattern": f"^{UUIDConvertor.regex}$"},
)


def job_out(job: Job) -> JobOut:
    by_epoch: dict[int, dict[str, float]] = {}
    for metric in job.metrics:
        by_epoch.setdefault(metric.epoch, {})[metric.name] = metric.value
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        params=job.params,
        progress=JobProgress.model_validate(job, from_attributes=True),
        metrics=[EpochMetrics(epoch=e, values=v) for e, v in sorted(by_epoch.items())],
        error=job.error,
        dataset=job.dataset.name if job.dataset else None,
        datasets=_datasets(job),
        cancel_requested=job.cancel_requested,
        worker=job.worker,
        model_version=job.model_version.ref if job.model_version else None,
        result=job.result,
        artifacts=jobs.list_artifacts(job.id),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _datasets(job: Job) -> list[DatasetUse] | None:
    """A pretraining job's datasets: what went in once the worker prepared them (its result), before
    that what was asked (its params)."""
    if job.kind != "pretrain":
        return None
    if job.result and "datasets" in job.result:
        return [DatasetUse(**used) for used in job.result["datasets"]]
    asked = job.params.get("dataset")
    if not isinstance(asked, list):
        asked = [{k: job.params.get(k) for k in ("folds", "record_limit")} | {"dataset": asked}]
    used = [
        DatasetUse(name=str(e["dataset"]), folds=e.get("folds"), record_limit=e.get("record_limit"))
        for e in asked
    ]
    if job.dataset is not None:  # the first entry's registered row
        used[0].name, used[0].kind = job.dataset.name, job.dataset.kind
    return used


@router.post(
    "/pretrain",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_api_key)],
    responses=errors(*QUEUE_ERRORS),
    summary="Queue a self-supervised pretraining job",
)
def submit_pretrain(
    body: PretrainRequest, request: Request, session: Session = Depends(db_session)
) -> JobCreated:
    datasets = jobs.pretrain_datasets(session, body)  # each entry of a list checked (4xx naming it)
    job = jobs.create_job(session, "pretrain", body, epochs=body.epochs, dataset=datasets[0])
    return _enqueue(session, job, request)


@router.post(
    "/finetune",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_api_key)],
    responses=errors(MODEL_NOT_FOUND, *QUEUE_ERRORS),
    summary="Queue a fine-tuning job: linear probe, full fine-tune, triplet head or VQ-VAE head",
)
def submit_finetune(
    body: FinetuneRequest, request: Request, session: Session = Depends(db_session)
) -> JobCreated:
    if body.model is not None:
        resolve_model_version(session, body.model)
    dataset = dataset_for_job(session, body.dataset)
    jobs.check_labelled(dataset)
    # (without a given epochs, the worker's progress sets the recipe's)
    job = jobs.create_job(session, "finetune", body, epochs=body.epochs or 0, dataset=dataset)
    return _enqueue(session, job, request)


@router.post(
    "/evaluate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_api_key)],
    responses=errors(MODEL_NOT_FOUND, *QUEUE_ERRORS),
    summary="Queue an evaluation job: kNN, linear probe and clustering of a version's embeddings",
)
def submit_evaluate(
    body: EvaluateRequest, request: Request, session: Session = Depends(db_session)
) -> JobCreated:
    resolve_model_version(session, body.model)
    dataset = dataset_for_job(session, body.dataset)
    jobs.check_labelled(dataset)
    epochs = body.probe_epochs if "linear_probe" in body.protocols else 0
    job = jobs.create_job(session, "evaluate", body, epochs=epochs, dataset=dataset)
    return _enqueue(session, job, request)


@router.post(
    "/embed",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_api_key)],
    responses=errors(MODEL_NOT_FOUND, *QUEUE_ERRORS),
    summary="Queue an embedding export: every record of a dataset embedded with a version, as files",
    description=(
        "The worker embeds each selected record exactly as POST /embed embeds an upload of it (same "
        "preprocessing, windowing and ONNX session path) and writes the job's artifacts `embeddings.npy` "
        "(float32, records x dimension), `records.json` (the version, and per row the record id, fold and "
        "labels where the dataset has them; the records that could not be embedded, with the reason) and "
        "`embeddings.parquet` where pyarrow is installed: GET /jobs/{id}/artifacts/{name}."
    ),
)
def submit_embed(
    body: EmbedDatasetParams, request: Request, session: Session = Depends(db_session)
) -> JobCreated:
    resolve_model_version(session, body.model)
    dataset = dataset_for_job(session, body.dataset)
    jobs.check_folds_fit_dataset(body.folds, dataset)
    job = jobs.create_job(session, "embed_dataset", body, epochs=0, dataset=dataset)
    return _enqueue(session, job, request)


def _enqueue(session: Session, job: Job, request: Request) -> JobCreated:
    """Commit the job and send its Celery task (``ecgssl.<kind>``) to the gpu queue."""
    session.commit()  # the worker must find the row as soon as the task arrives
    from worker import tasks

    task = {
        "pretrain": tasks.pretrain,
        "finetune": tasks.finetune,
        "evaluate": tasks.evaluate,
        "embed_dataset": tasks.embed_dataset,
    }[job.kind]
    try:
        task.apply_async(args=[str(job.id)], queue="gpu")
    except Exception as exc:  # broker down: record it on the job and tell the client to retry later
        jobs.fail_job(session, job.id, f"could not queue the job: broker unavailable ({exc})")
        session.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"broker unavailable: {exc}") from exc
    return JobCreated(job_id=job.id, status=job.status, url=str(request.url_for("get_job", job_id=job.id)))


@router.get("", response_model=JobList, responses=errors(422), summary="List jobs, newest first")
def list_jobs(
    status_filter: JobStatus | None = Query(None, alias="status"),
    limit: int = Query(50, ge=1, le=500),
    session: Session = Depends(db_session),
) -> JobList:
    return JobList(jobs=[job_out(j) for j in jobs.list_jobs(session, status_filter, limit)])


@router.get(
    "/{job_id:uuid}",
    response_model=JobOut,
    responses=errors(JOB_NOT_FOUND, 422),
    summary="A job's status, progress, metrics per epoch",
)
def get_job(job_id: uuid.UUID = JobId, session: Session = Depends(db_session)) -> JobOut:
    return job_out(jobs.get_job(session, job_id))


@router.post(
    "/{job_id:uuid}/cancel",
    response_model=JobOut,
    dependencies=[Depends(require_api_key)],
    responses=errors(401, JOB_NOT_FOUND, (409, "the job has already finished"), 422),
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: uuid.UUID = JobId, session: Session = Depends(db_session)) -> JobOut:
    job = jobs.request_cancel(session, job_id)
    session.commit()  # before the answer: the session's own commit comes after it is sent
    return job_out(job)


@router.get(
    "/{job_id:uuid}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {media: {} for media in ARTIFACT_TYPES.values()},
            "description": "the file: a PNG plot, or an embedding export's .npy, .json or .parquet",
        },
        **errors((404, "no job has that id, or it has no artifact of that name"), 422),
    },
    summary="One of a job's artifacts (plots; an embedding export's files), by the name GET /jobs/{id} lists",
)
def get_artifact(
    job_id: uuid.UUID = JobId,
    name: str = PathParam(
        ...,
        description="a name from the job's 'artifacts' list (another name: 404)",
        examples=["roc_knn.png"],
        json_schema_extra={"pattern": ARTIFACT_NAME.pattern, "maxLength": 130},
    ),
    session: Session = Depends(db_session),
) -> FileResponse:
    jobs.get_job(session, job_id)  # 404 for an unknown job
    path = jobs.artifact_path(job_id, name)
    return FileResponse(path, media_type=ARTIFACT_TYPES[path.suffix[1:]], filename=name)
