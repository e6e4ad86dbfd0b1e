"""Jobs: queue (pretraining, fine-tuning, evaluation, embedding export), list, inspect, cancel, and their
artifacts."""

import uuid
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.convertors import UUIDConvertor

from api.deps import SessionDep, require_api_key
from api.responses import errors
from api.schemas import (
    DatasetUse,
    EmbedRequest,
    EpochMetrics,
    EvaluateRequest,
    FinetuneRequest,
    JobCreated,
    JobList,
    JobOut,
    JobProgress,
    PretrainRequest,
)
from services.db.models import Job, JobStatus
from services.jobs import store as jobs
from services.jobs.store import ARTIFACT_NAME, ARTIFACT_TYPES, JOB_KINDS

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


def submission(
    path: str, summary: str, *refusals: int | tuple[int, str], description: str | None = None
) -> Callable:
    """The decorator of a job submission route: behind the API key, 202 with where to follow the job;
    ``refusals`` are its errors beside the queue's."""
    return router.post(
        path,
        status_code=status.HTTP_202_ACCEPTED,
        response_model=JobCreated,
        dependencies=[Depends(require_api_key)],
        responses=errors(*refusals, *QUEUE_ERRORS),
        summary=summary,
        description=description,
    )


@submission("/pretrain", "Queue a self-supervised pretraining job")
def submit_pretrain(session: SessionDep, body: PretrainRequest, request: Request) -> JobCreated:
    return queued(session, jobs.new_pretrain_job(session, body), request)


@submission(
    "/finetune",
    "Queue a fine-tuning job: linear probe, full fine-tune, triplet head or VQ-VAE head",
    MODEL_NOT_FOUND,
)
def submit_finetune(session: SessionDep, body: FinetuneRequest, request: Request) -> JobCreated:
    return queued(session, jobs.new_finetune_job(session, body), request)


@submission(
    "/evaluate",
    "Queue an evaluation job: kNN, linear probe and clustering of a version's embeddings",
    MODEL_NOT_FOUND,
)
def submit_evaluate(session: SessionDep, body: EvaluateRequest, request: Request) -> JobCreated:
    return queued(session, jobs.new_evaluate_job(session, body), request)


@submission(
    "/embed",
    "Queue an embedding export: every record of a dataset embedded with a version, as files",
    MODEL_NOT_FOUND,
    description=(
        "The worker embeds each selected record exactly as POST /embed embeds an upload of it (same "
        "preprocessing, windowing and ONNX session path) and writes the job's artifacts `embeddings.npy` "
        "(float32, records x dimension), `records.json` (the version, and per row the record id, fold and "
        "labels where the dataset has them; the records that could not be embedded, with the reason) and "
        "`embeddings.parquet` where pyarrow is installed: GET /jobs/{id}/artifacts/{name}."
    ),
)
def submit_embed(session: SessionDep, body: EmbedRequest, request: Request) -> JobCreated:
    return queued(session, jobs.new_embed_job(session, body), request)


def queued(session: SessionDep, job: Job, request: Request) -> JobCreated:
    """Send the new job to the worker's queue (``worker.tasks.enqueue``) and answer where to follow it."""
    from worker.tasks import enqueue  # the broker's settings, read when the first job is queued

    enqueue(session, job)
    return JobCreated(job_id=job.id, status=job.status, url=str(request.url_for("get_job", job_id=job.id)))


@router.get("", response_model=JobList, responses=errors(422), summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    status_filter: JobStatus | None = Query(None, alias="status"),
    kind: Literal[JOB_KINDS] | None = Query(None, description="only jobs of this kind"),  # type: ignore[valid-type]
    limit: int = Query(50, ge=1, le=500),
) -> JobList:
    return JobList(jobs=[job_out(j) for j in jobs.list_jobs(session, status_filter, limit, kind)])


@router.get(
    "/{job_id:uuid}",
    response_model=JobOut,
    responses=errors(JOB_NOT_FOUND, 422),
    summary="A job's status, progress, metrics per epoch",
)
def get_job(session: SessionDep, job_id: uuid.UUID = JobId) -> JobOut:
    return job_out(jobs.get_job(session, job_id))


@router.post(
    "/{job_id:uuid}/cancel",
    response_model=JobOut,
    dependencies=[Depends(require_api_key)],
    responses=errors(401, JOB_NOT_FOUND, (409, "the job has already finished"), 422),
    summary="Cancel a queued or running job",
)
def cancel_job(session: SessionDep, job_id: uuid.UUID = JobId) -> JobOut:
    job = jobs.request_cancel(session, job_id)
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
    session: SessionDep,
    job_id: uuid.UUID = JobId,
    name: str = PathParam(
        ...,
        description="a name from the job's 'artifacts' list (another name: 404)",
        examples=["roc_knn.png"],
        json_schema_extra={"pattern": ARTIFACT_NAME.pattern, "maxLength": 130},
    ),
) -> FileResponse:
    path = jobs.job_artifact(session, job_id, name)
    return FileResponse(path, media_type=ARTIFACT_TYPES[path.suffix[1:]], filename=name)
