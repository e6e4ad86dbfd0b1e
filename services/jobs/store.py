"""The jobs' store: the queries behind the jobs API (create, read, list, cancel), the checks made before a
job is queued, and where a job's files live (``<artifact_dir>/jobs/<id>/``)."""

import re
import uuid
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.config import get_settings
from services.datasets.registry import dataset_for_job
from services.db.models import FINISHED, Dataset, Job, JobStatus, utcnow
from services.errors import ClientError, ConflictError, NotFoundError
from services.jobs.params import EmbedDatasetParams, EvaluateParams, FinetuneParams, PretrainParams
from services.registry import resolve_model_version


def check_labelled(dataset: Dataset) -> None:
    """Downstream jobs need labels: refuse a dataset whose summary shows none."""
    counts = (dataset.summary or {}).get("label_counts") or {}
    if not any(counts.values()):
        raise ClientError(
            f"dataset '{dataset.name}' has no labels, so it cannot train or evaluate a classifier: use a "
            "labelled dataset (PTB-XL superclasses, a wfdb_folder with labels_csv, an npz with labels)"
        )


def check_folds_fit_dataset(wanted: list[int] | None, dataset: Dataset) -> None:
    folds = {int(f) for f in (dataset.summary or {}).get("folds", {})}
    if wanted and not folds:
        raise ClientError(f"'folds' was given but dataset '{dataset.name}' has no folds")
    if wanted and not folds & set(wanted):
        raise ClientError(
            f"dataset '{dataset.name}' has no record in folds {wanted} (it has {sorted(folds)})"
        )


def pretrain_datasets(session: Session, params: PretrainParams) -> list[Dataset]:
    """The registered dataset of each entry (a path is registered on first use), each checked against its
    entry's folds; an error names the entry of a list (index and name). Two entries of the same data
    (the same kind, path and options, e.g. a name and its path) are refused."""
    rows: list[Dataset] = []
    for i, entry in enumerate(params.entries):
        try:
            row = dataset_for_job(session, entry.dataset)
            check_folds_fit_dataset(entry.folds, row)
        except ClientError as exc:
            if not isinstance(params.dataset, list):
                raise
            raise type(exc)(f"dataset[{i}] '{entry.dataset}': {exc}") from exc
        for j, earlier in enumerate(rows):
            if (row.kind, row.path, row.options) == (earlier.kind, earlier.path, earlier.options):
                raise ClientError(
                    f"dataset[{i}] '{entry.dataset}' is the same data as dataset[{j}] "
                    f"'{params.entries[j].dataset}' (registered as '{row.name}'): give each dataset once"
                )
        rows.append(row)
    return rows


def create_job(
    session: Session, kind: str, params: BaseModel, epochs: int, dataset: Dataset | None = None
) -> Job:
    job = Job(
        kind=kind,
        status=JobStatus.queued,
        params=params.model_dump(mode="json"),
        epochs=epochs,
        dataset_id=dataset.id if dataset else None,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"job {job_id} does not exist")
    return job


JOB_KINDS = (
    "pretrain",
    "finetune",
    "evaluate",
    "embed_dataset",
)  # Job.kind (POST /jobs/embed: embed_dataset)


def list_jobs(
    session: Session, status: str | None = None, limit: int = 50, kind: str | None = None
) -> list[Job]:
    """The newest ``limit`` jobs, of ``status`` and ``kind`` where given."""
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return list(session.scalars(query))


def request_cancel(session: Session, job_id: uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one stops at its next step (the worker checks)."""
    job = get_job(session, job_id)
    if job.status in FINISHED:
        raise ConflictError(f"job {job_id} has already finished ({job.status}); nothing to cancel")
    job.cancel_requested = True
    if job.status == JobStatus.queued:
        job.status, job.finished_at, job.phase = JobStatus.cancelled, utcnow(), "cancelled before start"
    return job


def fail_job(session: Session, job_id: uuid.UUID, error: str) -> None:
    job = get_job(session, job_id)
    job.status, job.error, job.finished_at, job.phase = JobStatus.failed, error, utcnow(), "failed"


# --------------------------------------------------------------------------------------------------
# a job's files: <artifact_dir>/jobs/<id>/ (checkpoints, ONNX), and under artifacts/ what it gives the user:
# pictures (PNG), and an embedding export's arrays and tables (services.jobs.export_embeddings)

ARTIFACT_TYPES = {
    "png": "image/png",
    "npy": "application/octet-stream",
    "json": "application/json",
    "parquet": "application/vnd.apache.parquet",
}
ARTIFACT_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,120}}\.({'|'.join(ARTIFACT_TYPES)})$")


def job_dir(job_id: uuid.UUID) -> Path:
    return Path(get_settings().artifact_dir) / "jobs" / str(job_id)


def artifacts_dir(job_id: uuid.UUID) -> Path:
    """Where a job writes its artifacts (plots, exports)."""
    return job_dir(job_id) / "artifacts"


def list_artifacts(job_id: uuid.UUID) -> list[str]:
    folder = artifacts_dir(job_id)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and ARTIFACT_NAME.match(p.name))


def artifact_path(job_id: uuid.UUID, name: str) -> Path:
    """The file of a job's artifact ``name``; 404 for anything not in its listing (no path is built from a
    name that is not a plain artifact file name of that folder)."""
    if not ARTIFACT_NAME.match(name) or name not in list_artifacts(job_id):
        available = ", ".join(list_artifacts(job_id)) or "none"
        raise NotFoundError(f"job {job_id} has no artifact '{name}' (its artifacts: {available})")
    return artifacts_dir(job_id) / name


# --------------------------------------------------------------------------------------------------
# new jobs, checked against the database before they are queued


def new_pretrain_job(session: Session, params: PretrainParams) -> Job:
    """A queued pretraining job; each dataset entry is checked (a 4xx naming the entry of a list)."""
    datasets = pretrain_datasets(session, params)
    return create_job(session, "pretrain", params, epochs=params.epochs, dataset=datasets[0])


def new_finetune_job(session: Session, params: FinetuneParams) -> Job:
    """A queued fine-tuning job; the version it starts from (when it names one) must exist and its dataset
    must be labelled. Without epochs given, the worker's progress sets the recipe's."""
    if params.model is not None:
        resolve_model_version(session, params.model)
    dataset = dataset_for_job(session, params.dataset)
    check_labelled(dataset)
    return create_job(session, "finetune", params, epochs=params.epochs or 0, dataset=dataset)


def new_evaluate_job(session: Session, params: EvaluateParams) -> Job:
    """A queued evaluation job; the version it evaluates must exist and its dataset must be labelled."""
    resolve_model_version(session, params.model)
    dataset = dataset_for_job(session, params.dataset)
    check_labelled(dataset)
    epochs = params.probe_epochs if "linear_probe" in params.protocols else 0
    return create_job(session, "evaluate", params, epochs=epochs, dataset=dataset)


def new_embed_job(session: Session, params: EmbedDatasetParams) -> Job:
    """A queued embedding export; the version must exist and the dataset have the folds asked."""
    resolve_model_version(session, params.model)
    dataset = dataset_for_job(session, params.dataset)
    check_folds_fit_dataset(params.folds, dataset)
    return create_job(session, "embed_dataset", params, epochs=0, dataset=dataset)


def job_artifact(session: Session, job_id: uuid.UUID, name: str) -> Path:
    """The file of artifact ``name`` of job ``job_id`` (not found: an unknown job, or a name it does not
    list)."""
    get_job(session, job_id)
    return artifact_path(job_id, name)
