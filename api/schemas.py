"""Request and response bodies of the HTTP API."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from services.models.checkpoints import ImportFormat
from services.pretraining import PretrainParams


class PretrainRequest(PretrainParams):
    """Queue a self-supervised pretraining job."""

    model_config = ConfigDict(extra="forbid")


class JobCreated(BaseModel):
    job_id: uuid.UUID
    status: str
    url: str = Field(description="where to watch the job")


class EpochMetrics(BaseModel):
    epoch: int
    values: dict[str, float]


class JobProgress(BaseModel):
    phase: str | None
    epoch: int
    epochs: int
    step: int
    total_steps: int
    last_loss: float | None
    learning_rate: float | None
    samples_per_s: float | None
    eta_s: float | None


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    status: str
    params: dict
    progress: JobProgress
    metrics: list[EpochMetrics] = Field(default_factory=list, description="one entry per finished epoch")
    error: str | None
    dataset: str | None = Field(None, description="registered dataset (path under the data root)")
    cancel_requested: bool
    worker: str | None
    model_version: str | None = Field(None, description="'name@version' registered by this job")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    jobs: list[JobOut]


class ModelVersionOut(BaseModel):
    name: str
    version: int
    ref: str
    method: str
    source_job_id: uuid.UUID | None
    sha256: str
    input_spec: dict
    embedding_dim: int
    parity_max_abs_diff: float
    metrics: dict
    clinical_features: list[str] | None = Field(
        None, description="hybrid models: the clinical measurements appended to the embedding (then flags)"
    )
    created_at: datetime


class ModelOut(BaseModel):
    name: str
    method: str
    versions: list[ModelVersionOut]


class ModelList(BaseModel):
    models: list[ModelOut]


class RecordInfo(BaseModel):
    source: str
    fs: float
    duration_s: float
    channels: list[str]
    windows: int = Field(description="windows of the model's length averaged into the embedding")


class EmbedResponse(BaseModel):
    model: str
    version: int
    dimension: int
    embedding: list[float]
    record: RecordInfo


class DatasetOut(BaseModel):
    id: int
    name: str
    kind: str
    path: str | None
    options: dict
    summary: dict = Field(
        description="records, sampling_rates, leads, duration_s, label_counts, unlabelled, folds"
    )
    created_at: datetime


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class HealthOut(BaseModel):
    status: str
    database: str
    broker: str
    workers: list[str]


class ModelImportRequest(BaseModel):
    """Import a published encoder checkpoint (a file under the data root) as a new model version."""

    model_config = ConfigDict(extra="forbid")

    format: ImportFormat = Field(
        ...,
        description="checkpoint format: 'st_mem' = an official ST-MEM encoder or full (MAE) file; "
        "'ecg_jepa' = an official ECG-JEPA encoder file ({'encoder': state dict})",
    )
    path: str = Field(
        ...,
        min_length=1,
        description="the checkpoint file, relative to the data root (or absolute inside it)",
        examples=["checkpoints/st_mem_vit_base_encoder.pth"],
    )
    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="registry name; a new version if it exists"
    )
