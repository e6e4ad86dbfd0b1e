"""Training jobs: queue, list, inspect, cancel."""

import uuid

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sqlalchemy.orm import Session

from api.deps import db_session, require_api_key
from api.schemas import EpochMetrics, JobCreated, JobList, JobOut, JobProgress, PretrainRequest
from services import jobs
from services.dataset_registry import dataset_for_job
from services.db.models import Job, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


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
        cancel_requested=job.cancel_requested,
        worker=job.worker,
        model_version=job.model_version.ref if job.model_version else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.post(
    "/pretrain",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_api_key)],
    summary="Queue a self-supervised pretraining job",
)
def submit_pretrain(
    body: PretrainRequest, request: Request, session: Session = Depends(db_session)
) -> JobCreated:
    dataset = dataset_for_job(session, body.dataset)
    jobs.check_params_fit_dataset(body, dataset)
    job = jobs.create_job(session, "pretrain", body, epochs=body.epochs, dataset=dataset)
    session.commit()  # the worker must find the row as soon as the task arrives
    from worker.tasks import pretrain

    try:
        pretrain.apply_async(args=[str(job.id)], queue="gpu")
    except Exception as exc:  # broker down: record it on the job and tell the client to retry later
        jobs.fail_job(session, job.id, f"could not queue the job: broker unavailable ({exc})")
        session.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"broker unavailable: {exc}") from exc
    return JobCreated(job_id=job.id, status=job.status, url=str(request.url_for("get_job", job_id=job.id)))


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    status_filter: JobStatus | None = Query(None, alias="status"),
    limit: int = Query(50, ge=1, le=500),
    session: Session = Depends(db_session),
) -> JobList:
    return JobList(jobs=[job_out(j) for j in jobs.list_jobs(session, status_filter, limit)])


@router.get("/{job_id}", response_model=JobOut, summary="A job's status, progress, metrics per epoch")
def get_job(job_id: uuid.UUID, session: Session = Depends(db_session)) -> JobOut:
    return job_out(jobs.get_job(session, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    dependencies=[Depends(require_api_key)],
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: uuid.UUID, session: Session = Depends(db_session)) -> JobOut:
    return job_out(jobs.request_cancel(session, job_id))
