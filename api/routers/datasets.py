"""Datasets: register (validated, summarised), list, inspect."""

import re

from fastapi import APIRouter, Depends, status
from fastapi import Path as PathParam

from api.deps import SessionDep, require_api_key
from api.responses import errors, pattern_extra
from api.schemas import DatasetList, DatasetOut
from services.config import get_settings
from services.datasets import path_text_problem, relative_to_root
from services.datasets import registry as dataset_registry
from services.datasets.registry import DatasetRequest, get_dataset, register_dataset
from services.db.models import Dataset
from services.errors import ClientError

router = APIRouter(prefix="/datasets", tags=["datasets"])

MAX_ID = 2**31 - 1  # the datasets.id column (a 32-bit integer)
MAX_NAME = 200  # the datasets.name column
_CONTROL = r"\x00-\x1f\x7f-\x9f"  # Unicode category Cc, which dataset_ref refuses in a name
# A name: up to MAX_NAME characters, none a control character (nor '/', which a path segment cannot hold),
# at least one neither a digit nor a space (all digits: an id; blank: refused).
NAME_PATTERN = rf"^[^{_CONTROL}/]*[^0-9\s{_CONTROL}/][^{_CONTROL}/]*$"
DatasetRef = PathParam(
    ...,
    description=f"the dataset's id (1 to {MAX_ID}) or its name",
    examples=["ptbxl-500"],
    json_schema_extra=pattern_extra(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                {"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME},
            ]
        }
    ),
)


def dataset_out(row: Dataset) -> DatasetOut:
    """The row as the API shows it: its path relative to the data root (no server path is disclosed)."""
    out = DatasetOut.model_validate(row, from_attributes=True)
    out.path = relative_to_root(get_settings().data_root, row.path)
    return out


def dataset_ref(text: str) -> int | str:
    """An id (ASCII digits, 1 to MAX_ID) or else a name; ids out of that range are a 422 (the rules of
    ``DatasetRef``, checked here for messages that say more than a schema error)."""
    if not re.fullmatch(r"[0-9]+", text):  # not str.isdigit(): '²' is a digit but no integer
        if len(text) > MAX_NAME:
            raise ClientError(f"dataset name {text[:100]!r}... is over {MAX_NAME} characters")
        problem = path_text_problem(text)  # a name is a path under the data root, or a plain name
        if problem is not None:  # (PostgreSQL refuses a NUL in a query: a 500)
            raise ClientError(
                f"dataset name {text[:100]!r} {problem.replace('a path under', 'a name or a path under')}"
            )
        return text
    if len(text) > len(str(MAX_ID)) or not 1 <= int(text) <= MAX_ID:
        shown = text if len(text) <= 30 else f"{text[:20]}... ({len(text)} digits)"
        raise ClientError(
            f"dataset id {shown} is out of range: ids are whole numbers from 1 to {MAX_ID} "
            "(or give the dataset's name; GET /datasets lists them)"
        )
    return int(text)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    dependencies=[Depends(require_api_key)],
    responses=errors(400, 401, (409, "a dataset of that name is already registered"), 422),
    summary="Register a dataset: validates it and returns its summary (records, rates, leads, labels, folds)",
)
def create_dataset(session: SessionDep, body: DatasetRequest) -> DatasetOut:
    row = register_dataset(session, body)
    return dataset_out(row)


@router.get("", response_model=DatasetList, summary="Registered datasets")
def list_datasets(session: SessionDep) -> DatasetList:
    return DatasetList(datasets=[dataset_out(d) for d in dataset_registry.list_datasets(session)])


@router.get(
    "/{dataset_id}",
    response_model=DatasetOut,
    responses=errors((404, "no dataset has that id or name"), 422),
    summary="One dataset, by id or name",
)
def read_dataset(session: SessionDep, dataset_id: str = DatasetRef) -> DatasetOut:
    return dataset_out(get_dataset(session, dataset_ref(dataset_id)))
