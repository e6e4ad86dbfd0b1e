"""Registered datasets: validate a dataset once, keep its summary, open it for jobs."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.config import get_settings
from services.datasets import DataPath, relative_to_root, resolve_data_path
from services.datasets.base import EcgDataset
from services.datasets.kinds import detect_dataset_kind, open_dataset
from services.db.models import Dataset
from services.db.session import conflict_insert
from services.errors import ConflictError, DatasetError, NotFoundError

DatasetKind = Literal["ptbxl", "wfdb_folder", "cinc", "npz", "synthetic"]


class DatasetRequest(BaseModel):
    """Register a dataset under a name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.\-]{1,100}$", examples=["ptbxl-500"])
    kind: DatasetKind = Field(..., description="layout of the data", examples=["ptbxl"])
    path: DataPath | None = Field(
        None, description="path under the data root (not for 'synthetic')", examples=["ptbxl-500"]
    )
    options: dict = Field(
        default_factory=dict,
        description="per kind: ptbxl {sampling_rate: 100|500}; wfdb_folder {labels_csv}; cinc {mapping_csv}; "
        "synthetic {n, seed}",
        examples=[{"sampling_rate": 500}],
    )


def _resolve(kind: str, path: str | None) -> Path | None:
    if kind == "synthetic":
        if path:
            raise DatasetError("a 'synthetic' dataset is generated, it takes no path")
        return None
    if not path:
        raise DatasetError(f"a '{kind}' dataset needs 'path': a folder or file under the data root")
    return dataset_path(path)


def dataset_path(path: str) -> Path:
    """A dataset's folder or file under the data root; the root itself (all datasets at once) is refused."""
    resolved = resolve_data_path(get_settings().data_root, path)
    if resolved == Path(get_settings().data_root).resolve():
        raise DatasetError(
            f"dataset path '{path}' is the data root itself: give a dataset folder or file under it "
            "(e.g. 'ptbxl-500')"
        )
    return resolved


def register_dataset(session: Session, request: DatasetRequest, exist_ok: bool = False) -> Dataset:
    """Validate the dataset (opening it and summarising it) and store it; 409 if the name is taken, also
    meanwhile by another request (insert-if-absent: in PostgreSQL the insert waits for the other's commit;
    SQLite lets one writer in). ``exist_ok`` (a path's first use by a job): a taken name gives its row."""
    taken = ConflictError(f"a dataset named '{request.name}' is already registered")
    by_name = select(Dataset).where(Dataset.name == request.name)
    if (row := session.scalar(by_name)) is not None:
        if exist_ok:
            return row
        raise taken
    path = _resolve(request.kind, request.path)
    dataset = open_dataset(request.kind, path, request.options)
    values = {
        "name": request.name,
        "kind": request.kind,
        "path": str(path) if path else None,
        "options": request.options,
        "summary": dataset.summary(),
    }
    insert = conflict_insert(session)
    if insert is not None:
        statement = insert(Dataset).values(**values).on_conflict_do_nothing(index_elements=["name"])
        if session.scalar(statement.returning(Dataset.id)) is None and not exist_ok:
            raise taken
        return session.scalar(by_name.execution_options(populate_existing=True))
    row = Dataset(**values)  # another database: the plain ORM insert
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # registered meanwhile by another request (committed after our check)
        session.rollback()  # (the request fails: nothing of its transaction is kept)
        if session.scalar(select(Dataset.id).where(Dataset.name == request.name)) is None:
            raise
        raise taken from exc
    return row


def get_dataset(session: Session, ref: int | str) -> Dataset:
    row = (
        session.get(Dataset, ref)
        if isinstance(ref, int)
        else session.scalar(select(Dataset).where(Dataset.name == ref))
    )
    if row is None:
        raise NotFoundError(f"dataset '{ref}' is not registered (GET /datasets lists them)")
    return row


def dataset_for_job(session: Session, ref: str) -> Dataset:
    """A registered dataset by name, or a path under the data root registered on first use (two first uses
    at once get the one row)."""
    row = session.scalar(select(Dataset).where(Dataset.name == ref))
    if row is not None:
        return row
    path = dataset_path(ref)
    name = relative_to_root(get_settings().data_root, path)
    row = session.scalar(select(Dataset).where(Dataset.name == name))
    if row is not None:
        return row
    request = DatasetRequest.model_construct(
        name=name, kind=detect_dataset_kind(path), path=str(path), options={}
    )
    return register_dataset(session, request, exist_ok=True)


def open_registered(row: Dataset) -> tuple[EcgDataset, dict]:
    """The dataset object and its identity (what a preprocessed cache of it is keyed by)."""
    path = Path(row.path) if row.path else None
    if path is not None and not path.exists():
        shown = relative_to_root(get_settings().data_root, row.path)
        raise DatasetError(f"dataset '{row.name}': its path '{shown}' no longer exists under the data root")
    identity = {
        "kind": row.kind,
        "path": row.path,
        "options": row.options,
        "mtime_ns": path.stat().st_mtime_ns if path is not None else None,
    }
    return open_dataset(row.kind, path, row.options), identity


def list_datasets(session: Session) -> list[Dataset]:
    """Every registered dataset, by id."""
    return list(session.scalars(select(Dataset).order_by(Dataset.id)))
