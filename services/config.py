"""All settings of the service, in one place (environment prefix ``ECGSSL_``).

The defaults are the *embedded default*: SQLite for the database, Celery's SQLAlchemy transport on
SQLite for the broker, artifacts under ``./var``. Production (docker compose) points the same
settings at PostgreSQL and Redis.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
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

    upload_max_bytes: int = Field(50 * 1024 * 1024, description="largest accepted upload, all files together")
    worker_heartbeat_s: float = Field(5.0, description="how often a worker writes its heartbeat")
    worker_stale_s: float = Field(30.0, description="a worker silent for longer counts as gone")
    visibility_timeout_s: int = Field(
        48 * 3600, description="broker redelivers an unacknowledged task after this (longer than any job)"
    )
    default_model: str | None = Field(None, description="model served when a request names none")
    train_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="processes (one per GPU) a training job runs under torchrun; 0 = one per visible CUDA "
        "GPU, 1 on the CPU; above 1 on the CPU: that many gloo processes",
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
