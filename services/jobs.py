"""Jobs: what a pretraining job takes, and the queries behind the jobs API (no torch imported here)."""

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db.models import FINISHED, Dataset, Job, JobStatus, utcnow
from services.errors import ClientError, ConflictError, NotFoundError


class JepaMasking(BaseModel):
    """ECG-JEPA's time masking (the same patches masked in every lead)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["block", "random"] = Field(
        "block", description="block: union of several runs of patches; random: patches at random"
    )
    scale: tuple[float, float] | None = Field(
        None,
        description="ratio range (low, high): per block for 'block' (default 0.175-0.225), of all "
        "patches for 'random' (default 0.6-0.7)",
    )
    blocks: int = Field(4, ge=1, le=16, description="runs per mask ('block' only)")
    original_block_starts: bool = Field(
        False, description="the original sampler's block starts, which never mask the last patch"
    )

    @field_validator("scale")
    @classmethod
    def _scale_is_a_range(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        if scale is not None and not 0 < scale[0] <= scale[1] < 1:
            raise ValueError("scale must be (low, high) with 0 < low <= high < 1")
        return scale


METHOD_SIZES = {"st_mem": ("tiny", "small", "base"), "ecg_jepa": ("tiny", "base")}


class PretrainParams(BaseModel):
    """What a pretraining job needs; validated by the API and again by the worker."""

    dataset: str = Field(
        ...,
        description="a registered dataset's name (POST /datasets), or a path under the data root "
        "(a PTB-XL folder, a WFDB folder, a .npz), registered on first use",
        examples=["ptbxl-500"],
    )
    method: Literal["st_mem", "ecg_jepa"] = Field(
        "st_mem", description="st_mem: masked autoencoder (12 leads); ecg_jepa: JEPA with CroPA (8 leads)"
    )
    model_size: Literal["tiny", "small", "base"] = Field(
        "tiny", description="tiny (CPU demo), small (ST-MEM only), base (the published encoders)"
    )
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="registry name; default '<method>-<size>'"
    )
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="peak lr; default ST-MEM 1.5e-4 x batch_size / 256, ECG-JEPA 5.5e-5 x batch_size / 64",
    )
    weight_decay: float | None = Field(
        None, ge=0, le=1.0, description="AdamW weight decay; default ST-MEM 0.01, ECG-JEPA 0.05"
    )
    warmup_epochs: float = Field(3.0, ge=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="ST-MEM: share of each lead's patches masked")
    jepa_masking: JepaMasking = Field(default_factory=JepaMasking, description="ECG-JEPA: time masking")
    clinical_features: bool = Field(
        False,
        description="hybrid model: its embedding is the encoder's followed by the record's clinical "
        "measurements (NeuroKit2 at the record's own rate: HR, SDNN, RMSSD, PR, QRS, QT, QTc, ST in "
        "II/V2/V5, QRS axis), standardised with statistics of the job's training records, and one "
        "missing flag each",
    )
    seed: int = Field(0, ge=0)
    record_limit: int | None = Field(None, ge=2, description="use at most this many records")
    folds: list[int] | None = Field(
        None, description="PTB-XL strat_fold values to use (e.g. 1-8 to keep 9/10 unseen); default all"
    )
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="records held out for the per-epoch val_loss")
    checkpoint_every: int = Field(5, ge=1)

    @field_validator("folds")
    @classmethod
    def _folds_in_range(cls, folds: list[int] | None) -> list[int] | None:
        if folds is not None and (not folds or any(f < 1 or f > 10 for f in folds)):
            raise ValueError("folds must be a non-empty list of PTB-XL strat_fold values 1-10")
        return folds

    @model_validator(mode="after")
    def _size_exists_for_the_method(self) -> "PretrainParams":
        if self.model_size not in METHOD_SIZES[self.method]:
            raise ValueError(
                f"model_size '{self.model_size}' does not exist for {self.method}: "
                f"one of {', '.join(METHOD_SIZES[self.method])}"
            )
        return self

    @property
    def peak_lr(self) -> float:
        if self.learning_rate:
            return self.learning_rate
        if self.method == "ecg_jepa":
            return 5.5e-5 * self.batch_size / 64
        return 1.5e-4 * self.batch_size / 256

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.method == "ecg_jepa" else 0.01

    @property
    def registry_name(self) -> str:
        return self.model_name or f"{self.method}-{self.model_size}"


def check_params_fit_dataset(params: PretrainParams, dataset: Dataset) -> None:
    """Refuse, before queueing, what the dataset's summary already shows cannot work."""
    folds = {int(f) for f in (dataset.summary or {}).get("folds", {})}
    if params.folds and not folds:
        raise ClientError(f"'folds' was given but dataset '{dataset.name}' has no folds")
    if params.folds and not folds & set(params.folds):
        raise ClientError(
            f"dataset '{dataset.name}' has no record in folds {params.folds} (it has {sorted(folds)})"
        )


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


def list_jobs(session: Session, status: str | None = None, limit: int = 50) -> list[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
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
