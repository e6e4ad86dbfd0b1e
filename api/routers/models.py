"""The model registry, and importing published checkpoints into it."""

from fastapi import APIRouter, Depends, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import db_session, require_api_key
from api.schemas import ModelImportRequest, ModelList, ModelOut, ModelVersionOut
from services.db.models import Model, ModelVersion
from services.model_import import import_checkpoint

router = APIRouter(prefix="/models", tags=["models"])


def version_out(v: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(
        name=v.model.name,
        version=v.version,
        ref=v.ref,
        method=v.model.method,
        source_job_id=v.source_job_id,
        sha256=v.sha256,
        input_spec=v.input_spec,
        embedding_dim=v.embedding_dim,
        parity_max_abs_diff=v.parity_max_abs_diff,
        metrics=v.metrics,
        clinical_features=v.clinical_normaliser["names"] if v.clinical_normaliser else None,
        created_at=v.created_at,
    )


@router.get("", response_model=ModelList, summary="Registered models and their versions")
def list_models(session: Session = Depends(db_session)) -> ModelList:
    models = session.scalars(select(Model).order_by(Model.name))
    return ModelList(
        models=[
            ModelOut(name=m.name, method=m.method, versions=[version_out(v) for v in m.versions])
            for m in models
        ]
    )


@router.post(
    "/import",
    response_model=ModelVersionOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_api_key)],
    summary="Import a published encoder checkpoint (under the data root) as a new model version",
    description=(
        "Loads the checkpoint with strict key matching (format 'st_mem': the official ST-MEM encoder file, "
        "a dict whose 'model' holds 166 tensors for ViT-B/75, or the full masked-autoencoder file, 228 "
        "tensors), exports the encoder to ONNX, checks ONNX Runtime against PyTorch on real ECG windows and "
        "registers the version. Synchronous: seconds for small models, up to ~30 s for ViT-B on a small "
        "CPU. A file of another layout is refused (422) with the missing, unexpected or mis-shaped keys."
    ),
)
def import_model(body: ModelImportRequest, session: Session = Depends(db_session)) -> ModelVersionOut:
    return version_out(import_checkpoint(session, body.format, body.path, body.name))
