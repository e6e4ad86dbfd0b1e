"""Datasets: register (validated, summarised), list, inspect."""

from fastapi import APIRouter, Depends, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import db_session, require_api_key
from api.schemas import DatasetList, DatasetOut
from services.dataset_registry import DatasetRequest, get_dataset, register_dataset
from services.db.models import Dataset

router = APIRouter(prefix="/datasets", tags=["datasets"])


def dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut.model_validate(row, from_attributes=True)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    dependencies=[Depends(require_api_key)],
    summary="Register a dataset: validates it and returns its summary (records, rates, leads, labels, folds)",
)
def create_dataset(body: DatasetRequest, session: Session = Depends(db_session)) -> DatasetOut:
    return dataset_out(register_dataset(session, body))


@router.get("", response_model=DatasetList, summary="Registered datasets")
def list_datasets(session: Session = Depends(db_session)) -> DatasetList:
    return DatasetList(
        datasets=[dataset_out(d) for d in session.scalars(select(Dataset).order_by(Dataset.id))]
    )


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset, by id or name")
def read_dataset(dataset_id: str, session: Session = Depends(db_session)) -> DatasetOut:
    return dataset_out(get_dataset(session, int(dataset_id) if dataset_id.isdigit() else dataset_id))
