"""Model registry: register versions, resolve ``name``, ``name@version`` or the default model."""

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.models import Model, ModelVersion
from services.errors import ClientError, NotFoundError


def register_model_version(
    session: Session,
    *,
    name: str,
    method: str,
    source_job_id: uuid.UUID | None,
    onnx_path: str,
    sha256: str,
    input_spec: dict,
    embedding_dim: int,
    parity_max_abs_diff: float,
    metrics: dict,
    clinical_normaliser: dict | None = None,
) -> ModelVersion:
    """Add the next version of model ``name`` (created on first use)."""
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(name=name, method=method)
        session.add(model)
        session.flush()
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))
    version = ModelVersion(
        model=model,
        version=(latest or 0) + 1,
        source_job_id=source_job_id,
        onnx_path=onnx_path,
        sha256=sha256,
        input_spec=input_spec,
        embedding_dim=embedding_dim,
        parity_max_abs_diff=parity_max_abs_diff,
        metrics=metrics,
        clinical_normaliser=clinical_normaliser,
    )
    session.add(version)
    session.flush()
    return version


def resolve_model_version(session: Session, ref: str | None) -> ModelVersion:
    """``name@version``, ``name`` (its latest version), or None: the configured default, else the newest."""
    ref = ref or get_settings().default_model
    if not ref:
        newest = session.scalar(
            select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        )
        if newest is None:
            raise NotFoundError(
                "no model is registered yet: run a pretraining job first (POST /jobs/pretrain)"
            )
        return newest
    name, _, version_text = ref.partition("@")
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFoundError(f"model '{name}' is not registered (GET /models lists the models)")
    if not version_text:
        if not model.versions:
            raise NotFoundError(f"model '{name}' has no version yet")
        return model.versions[-1]
    if not version_text.isdigit():
        raise ClientError(f"model reference '{ref}': the version after '@' must be a number, e.g. {name}@1")
    for candidate in model.versions:
        if candidate.version == int(version_text):
            return candidate
    raise NotFoundError(f"model '{name}' has no version {version_text}")
