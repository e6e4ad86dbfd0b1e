"""The model registry."""

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import db_session
from api.schemas import ModelList, ModelOut, ModelVersionOut
from services.db.models import Model, ModelVersion

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
