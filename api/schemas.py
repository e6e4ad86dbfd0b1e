"""Request and response bodies of the HTTP API."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from services.datasets import DataPath
from services.ecg.recording import Recording
from services.jobs.params import EmbedDatasetParams, EvaluateParams, FinetuneParams, PretrainParams
from services.models.catalog import ImportFormat

# The bodies' examples run, in this order, on a fresh install with ../shared/data: the pretraining job
# registers st_mem-tiny@1, which the others use (tests/test_docs_examples.py runs them).
PRETRAIN_EXAMPLE = {
    "dataset": "ptbxl-500",
    "method": "st_mem",
    "model_size": "tiny",
    "epochs": 2,
    "batch_size": 8,
    "record_limit": 32,
}
FINETUNE_EXAMPLE = {"model": "st_mem-tiny@1", "dataset": "ptbxl-500", "method": "linear_probe", "epochs": 5}
EVALUATE_EXAMPLE = {
    "model": "st_mem-tiny@1",
    "dataset": "ptbxl-500",
    "protocols": ["knn", "linear_probe"],
    "probe_epochs": 20,
}
EMBED_EXAMPLE = {"model": "st_mem-tiny@1", "dataset": "ptbxl-500", "folds": [10], "record_limit": 16}


class PretrainRequest(PretrainParams):
    """Queue a self-supervised pretraining job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [PRETRAIN_EXAMPLE]})


class FinetuneRequest(FinetuneParams):
    """Queue a fine-tuning job: a registered encoder adapted to a labelled dataset, registered as a new
    version (diagnosis model for linear_probe / finetune, embedding model for triplet / vqvae)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [FINETUNE_EXAMPLE]})


class EvaluateRequest(EvaluateParams):
    """Queue an evaluation job of a registered version's embeddings on a labelled dataset."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EVALUATE_EXAMPLE]})


class EmbedRequest(EmbedDatasetParams):
    """Queue an embedding export: every selected record of a dataset embedded with a version, as files."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EMBED_EXAMPLE]})


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


class DatasetUse(BaseModel):
    """One dataset of a pretraining job: what was asked, and (once the worker prepared it) what went in."""

    name: str = Field(description="the registered dataset (before the worker opened it: as requested)")
    kind: str | None = None
    folds: list[int] | None = Field(None, description="the folds selected (null: all)")
    record_limit: int | None = None
    records: int | None = Field(None, description="records used (selected and readable)")
    segments: int | None = Field(None, description="10-s segments of those records")
    train_segments: int | None = None
    val_segments: int | None = Field(None, description="segments of the records held out for val_loss")
    skipped: int | None = Field(None, description="selected records that could not be used")


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    status: str
    params: dict
    progress: JobProgress
    metrics: list[EpochMetrics] = Field(default_factory=list, description="one entry per finished epoch")
    error: str | None
    dataset: str | None = Field(
        None, description="registered dataset (path under the data root); several: the first"
    )
    datasets: list[DatasetUse] | None = Field(
        None, description="pretraining jobs: each dataset trained on, with its selection and record counts"
    )
    cancel_requested: bool
    worker: str | None
    model_version: str | None = Field(None, description="'name@version' registered by this job")
    result: dict | None = Field(
        None,
        description="pretraining jobs, once their data is prepared: {datasets: [...]} (as 'datasets'); "
        "downstream jobs, once finished: metrics per protocol (macro and per-class AUROC, macro "
        "F1 at thresholds tuned on the validation split, kNN, cluster indices), records per split, artifacts",
    )
    artifacts: list[str] = Field(
        default_factory=list, description="PNG files of the job: GET /jobs/{id}/artifacts/{name}"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    jobs: list[JobOut]


class VariantOut(BaseModel):
    """One ONNX file of a version: fp32 (the reference), int8 (CPU) or fp16 (CUDA), and its check."""

    status: str = Field(
        description="reference (fp32); passed / failed: cosine to fp32 on real records vs the threshold; "
        "unchecked (no real records to check on: never served automatically); error (could not be made)"
    )
    sha256: str | None = None
    bytes: int | None = None
    cosine_min: float | None = Field(
        None, description="lowest cosine similarity to fp32 over the check windows"
    )
    cosine_mean: float | None = None
    max_abs_diff: float | None = None
    threshold: float | None = None
    probabilities_max_abs_diff: float | None = Field(
        None, description="diagnosis models: largest probability difference to fp32 (must be <= 0.01)"
    )
    check_records: list[str] | None = Field(
        None, description="the real records checked (under the data root)"
    )
    checked_on: str | None = Field(None, description="ONNX Runtime provider of the check")
    seconds: float | None = Field(None, description="time to make and check it")
    reason: str | None = None
    error: str | None = None


class ServingOut(BaseModel):
    """What this API process serves for the version under the current settings."""

    variant: str
    device: str
    reason: str
    loaded: bool = Field(description="a session of the version is loaded in this process")


class ModelVersionOut(BaseModel):
    name: str
    version: int
    ref: str
    method: str
    source_job_id: uuid.UUID | None
    sha256: str = Field(description="sha256 of the fp32 ONNX file")
    input_spec: dict
    embedding_dim: int
    parity_max_abs_diff: float = Field(
        description="largest PyTorch-vs-ONNX (fp32) difference on real records"
    )
    metrics: dict = Field(
        description="final epoch's losses and what went in: records, train_segments, skipped_records, and "
        "per dataset (pretrained versions) 'datasets': name, kind, folds, record_limit, records, segments, "
        "train_segments, val_segments, skipped"
    )
    clinical_features: list[str] | None = Field(
        None, description="hybrid models: the clinical measurements appended to the embedding (then flags)"
    )
    head: dict | None = Field(
        None,
        description="diagnosis models: class names, per-class thresholds tuned on the validation split, the "
        "test scores; POST /predict serves their probabilities",
    )
    knn_reference: dict | None = Field(
        None,
        description="a stored labelled reference set (training-split embeddings): POST /predict?method=knn",
    )
    aliases: list[str] = Field(default_factory=list, description="aliases that point at this version")
    variants: dict[str, VariantOut] = Field(
        default_factory=dict, description="ONNX variants by name (fp32, int8, fp16) and their checks"
    )
    serving: ServingOut | None = Field(None, description="single-version endpoint: what this process serves")
    created_at: datetime


class ModelOut(BaseModel):
    name: str
    method: str
    aliases: dict[str, int] = Field(default_factory=dict, description="alias -> version")
    versions: list[ModelVersionOut]


class ModelList(BaseModel):
    models: list[ModelOut]


class AliasSet(BaseModel):
    """Point an alias at a version of the model."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(
        ..., ge=1, le=2**31 - 1, description="the version number the alias should name", examples=[2]
    )


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
    ref: str = Field(description="'name@version' the alias names now")
    previous_version: int | None = Field(None, description="PUT: the version the alias named before, if any")
    updated_at: datetime


class AliasList(BaseModel):
    model: str
    aliases: list[AliasOut]


class RecordInfo(BaseModel):
    source: str
    fs: float
    duration_s: float
    channels: list[str]
    windows: int = Field(
        description="windows of the model's length averaged into the result (/predict: 3 crops per 10-s "
        "segment)"
    )

    @classmethod
    def of(cls, recording: Recording, windows: int) -> "RecordInfo":
        return cls(
            source=recording.source,
            fs=recording.fs,
            duration_s=round(recording.duration_s, 3),
            channels=recording.lead_names,
            windows=windows,
        )


class EmbedResponse(BaseModel):
    model: str
    version: int
    dimension: int
    embedding: list[float]
    record: RecordInfo
    variant: str | None = Field(None, description="ONNX variant that served: fp32, int8 or fp16")
    provider: str | None = Field(None, description="ONNX Runtime execution provider that served")


class RecordResult(BaseModel):
    """The outcome for one record of a several-record request."""

    index: int = Field(description="position of the record in the upload (0-based)")
    source: str = Field(description="the record's header or file name; 'archive.zip:path' inside a zip")
    ok: bool
    status_code: int = Field(description="200, or the 4xx this record alone would have got from POST /embed")
    dimension: int | None = None
    embedding: list[float] | None = None
    record: RecordInfo | None = None
    error: str | None = Field(None, description="what is wrong with this record and what was expected")


class KnnInfo(BaseModel):
    k: int
    metric: str
    reference_records: int = Field(description="labelled training records the record was compared with")
    dataset: str


class PredictResponse(BaseModel):
    model: str
    version: int
    method: str = Field(description="head: the diagnosis model's own head; knn: votes of the reference set")
    classes: list[str]
    probabilities: dict[str, float] = Field(
        description="per class, in [0, 1] and independent of the others (multi-label: they need not sum to "
        "1); head: the mean over the record's 10-s segments of the mean over each one's 3 crops; knn: the "
        "share of the k neighbours with the class"
    )
    thresholds: dict[str, float | None] = Field(
        description="per class, tuned on the validation split (max F1); None: never predicted"
    )
    labels: list[str] = Field(description="the classes whose probability reaches their threshold")
    record: RecordInfo
    knn: KnnInfo | None = None
    variant: str | None = Field(None, description="ONNX variant that served: fp32, int8 or fp16")
    provider: str | None = Field(None, description="ONNX Runtime execution provider that served")


class EmbedBatchResponse(BaseModel):
    model: str
    version: int
    variant: str
    provider: str
    records: list[RecordResult] = Field(description="one result per record, in upload order")


class DatasetOut(BaseModel):
    id: int
    name: str
    kind: str
    path: str | None = Field(description="relative to the data root; null for 'synthetic'")
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

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"format": "st_mem", "path": "checkpoints/st_mem_vit_base_encoder.pth", "name": "st_mem-base"}
            ]
        },
    )

    format: ImportFormat = Field(
        ...,
        description="checkpoint format: 'st_mem' = an official ST-MEM encoder or full (MAE) file; "
        "'ecg_jepa' = an official ECG-JEPA encoder file ({'encoder': state dict})",
    )
    path: DataPath = Field(
        ...,
        description="the checkpoint file, relative to the data root (or absolute inside it)",
        examples=["checkpoints/st_mem_vit_base_encoder.pth"],
    )
    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="registry name; a new version if it exists"
    )


# GET /methods: the model families, their sizes and recipes

_STANDARD_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
_BENCHMARK = "reports/benchmark.py (validation folds of the 10-fold cross-validation)"
METHODS_EXAMPLE = {  # resnet1d tiny as the service lists it (tests/test_methods.py checks it still is)
    "families": [
        {
            "name": "resnet1d",
            "method": "simclr",
            "description": "1-D ResNet (resnet1d_wang), SimCLR with ECG augmentations "
            "(12 leads, 100 Hz, 2.5 s)",
            "sizes": [
                {
                    "name": "tiny",
                    "input": {"leads": _STANDARD_LEADS, "fs": 100.0, "samples": 250},
                    "embedding_dim": 128,
                    "encoder_parameters": 113024,
                    "pretrain_recipe": {
                        "learning_rate": 0.001,
                        "batch_size": 128,
                        "epochs": 150,
                        "weight_decay": 0.01,
                        "warmup_epochs": 5.0,
                        "evidence": _BENCHMARK,
                    },
                    "finetune_recipe": {
                        "learning_rate": 0.001,
                        "batch_size": 64,
                        "epochs": 30,
                        "weight_decay": 0.01,
                        "warmup_epochs": 9.0,
                        "layer_decay": 1.0,
                        "augment": False,
                        "ensemble": 1,
                        "probe_first": True,
                        "ema_decay": 0.0,
                        "wise_ft": 1.0,
                        "scratch_learning_rate": 0.01,
                        "scratch_ema_decay": 0.97,
                        "evidence": _BENCHMARK,
                    },
                }
            ],
        }
    ]
}


class MethodInput(BaseModel):
    """What the encoder consumes (uploads are resampled and cut to this)."""

    leads: list[str] = Field(description="lead names, in the order the encoder takes them")
    fs: float = Field(description="sampling rate in Hz")
    samples: int = Field(description="samples per window (window length: samples / fs seconds)")


class PretrainRecipeOut(BaseModel):
    """A pretraining job's defaults for the size (what POST /jobs/pretrain fills in when not given)."""

    learning_rate: float = Field(description="peak lr at this batch_size; scaled linearly with batch_size")
    batch_size: int
    epochs: int
    weight_decay: float = Field(description="AdamW")
    warmup_epochs: float
    evidence: str = Field(description="where the recipe was shown to learn (a reports/ command or the paper)")


class FinetuneRecipeOut(PretrainRecipeOut):
    """A fine-tuning job's defaults (method finetune) for the size."""

    layer_decay: float = Field(
        description="layer-wise lr decay over the encoder's blocks, a CNN's stem and stages (1.0: none; "
        "a family trained from scratch runs without it)"
    )
    augment: bool = Field(description="ST-MEM's RandAugment on the training windows")
    ensemble: int = Field(description="members trained (seeds seed, seed + 1, ...), served as their mean")
    ema_decay: float = Field(
        description="decay of the per-step moving average of the weights that is validated and kept (0: off)"
    )
    probe_first: bool = Field(
        description="LP-FT: the head fitted on the frozen encoder first (from a pretrained encoder only)"
    )
    wise_ft: float = Field(
        description="WiSE-FT: the weights validated and kept are (1 - a) * LP-FT's start + a * the "
        "fine-tuned ones (1: the fine-tuned ones; from a pretrained encoder only)"
    )
    scratch_learning_rate: float | None = Field(
        description="peak lr at this batch_size for the family trained from scratch (no base model); "
        "null: learning_rate"
    )
    scratch_ema_decay: float | None = Field(
        description="ema_decay for the family trained from scratch (no base model); null: ema_decay"
    )


class MethodSize(BaseModel):
    name: str = Field(description="the model_size of a job")
    input: MethodInput
    embedding_dim: int = Field(description="size of the embedding the encoder returns (per window)")
    encoder_parameters: int = Field(description="parameters of the encoder (without heads or decoders)")
    pretrain_recipe: PretrainRecipeOut
    finetune_recipe: FinetuneRecipeOut | None = Field(description="null: the size has no fine-tuning recipe")


class MethodFamily(BaseModel):
    name: str = Field(description="the family, as FinetuneRequest.family and model versions name it")
    method: str = Field(description="its self-supervised pretraining method, as PretrainRequest.method")
    description: str
    sizes: list[MethodSize]


class MethodList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [METHODS_EXAMPLE]})

    families: list[MethodFamily]
