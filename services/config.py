"""All settings of the service, in one place (environment prefix ``ECGSSL_``).

The defaults are the *embedded default*: SQLite for the database, Celery's SQLAlchemy transport on
SQLite for the broker, artifacts under ``./var``. Production (docker compose) points the same
settings at PostgreSQL and Redis.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECGSSL_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///./var/ecgssl.db", description="SQLAlchemy URL of the run log and model registry"
    )
    broker_url: str = Field(
        "sqla+sqlite:///./var/broker.db", description="Celery broker (redis://... in production)"
    )
    artifact_dir: Path = Field(Path("./var/artifacts"), description="checkpoints, ONNX files, reports")
    data_root: Path = Field(Path("./var/data"), description="every dataset path is resolved inside it")
    api_key: str | None = Field(None, description="when set, mutating endpoints need 'Bearer <key>'")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device; auto = CUDA if any")

    sqlite_busy_timeout_s: float = Field(
        30.0,
        gt=0,
        description="SQLite: how long a write waits for another's lock before 'database is locked'",
    )
    db_retry_s: float = Field(
        300.0,
        ge=0,
        description="how long a job retries a database write that failed transiently (a lock held past the "
        "busy timeout, a dropped connection), with backoff, before the job fails",
    )
    upload_max_bytes: int = Field(
        50 * 1024 * 1024,
        ge=1,
        description="largest accepted request body (an upload's files and form fields together), in bytes: "
        "a larger Content-Length is refused with 413 before anything is read, a chunked body as soon as "
        "it passes the limit",
    )
    upload_max_seconds: float = Field(
        3600.0,
        gt=0,
        description="longest record an upload may hold, in seconds: checked from the file's header or array "
        "shape before its samples are decoded; a longer record is refused with 413",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines of the gateway and the worker: 'text', or 'json' (one object per line: time, "
        "level, logger, message, request_id, job_id)",
    )
    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="a worker serves its Prometheus metrics (epoch durations, job runs, its heartbeat) at "
        "http://<host>:<port>/metrics from the process that runs its tasks; 0 = not served",
    )
    worker_heartbeat_s: float = Field(5.0, description="how often a worker writes its heartbeat")
    worker_stale_s: float = Field(30.0, description="a worker silent for longer counts as gone")
    visibility_timeout_s: int = Field(
        48 * 3600, description="broker redelivers an unacknowledged task after this (longer than any job)"
    )
    ship_default_model: bool = Field(
        True,
        description="register the diagnosis model shipped in models/default on first start (and point its "
        "'production' alias at it), so that /predict and /embed serve without a training step",
    )
    default_model: str | None = Field(
        None,
        description="model served when a request names none: 'name' (its 'production' alias), 'name@alias' "
        "or 'name@version'; unset: the shipped model's 'production' alias (models/default, registered on "
        "first start), else the first model registered's; never simply the newest version",
    )
    serve_precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto",
        description="ONNX variant served: auto = int8 on the CPU and fp16 on CUDA where the version's "
        "variant passed its check on real records, else fp32",
    )
    serve_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider for serving; auto = CUDA when ONNX Runtime has it"
    )
    serve_max_batch: int = Field(
        16, ge=1, le=1024, description="micro-batching: most windows gathered into one session run"
    )
    serve_max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="micro-batching: longest a run waits for requests in progress (holding the session, "
        "still preparing their windows) to join it; a request alone never waits",
    )
    serve_threads: int = Field(
        0, ge=0, le=256, description="ONNX Runtime intra-op threads per session (CPU); 0 = one per core"
    )
    serve_spinning: bool = Field(
        False,
        description="let idle ONNX Runtime threads spin-wait for work: lower latency on a dedicated machine, "
        "but on a small or shared CPU they take the cores request handling needs",
    )
    serve_cache_size: int = Field(8, ge=1, le=64, description="ONNX Runtime sessions kept loaded per process")
    serve_max_records: int = Field(
        64,
        ge=1,
        le=10_000,
        description="records one POST /embed/batch may carry (records, not files: a WFDB record's files "
        "count once, each record in a .zip counts); more is refused with 413",
    )
    serve_max_windows: int = Field(
        2048,
        ge=1,
        description="model windows one request may cut from its records together (POST /embed, /predict, "
        "/embed/batch), counted from each record's header before it is decoded; more is refused with 413. "
        "The default takes one record of ECGSSL_UPLOAD_MAX_SECONDS through /predict (1080 windows for an "
        "hour at 250 Hz) and bounds the windows a request holds to about 220 MB (12 x 2250 float32 each)",
    )
    export_variants: str = Field(
        "auto",
        description="variants made when a version is registered: auto = int8, plus fp16 where ONNX Runtime "
        "has CUDA; or a comma-separated list of int8, fp16; or none",
    )
    train_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="processes (one per GPU) a training job runs under torchrun; 0 = one per visible CUDA "
        "GPU, 1 on the CPU; above 1 on the CPU: that many gloo processes",
    )

    @field_validator("export_variants")
    @classmethod
    def _known_variants(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "none"):
            return value
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(names) - {"int8", "fp16"})
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}: use auto, none, or int8,fp16")
        return ",".join(names)


@lru_cache
def get_settings() -> Settings:
    return Settings()
