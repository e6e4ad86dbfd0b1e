"""An uploaded ECG as the service reads it and as a model sees it, and its nearest reference records."""

import math

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

from api.deps import SessionDep, require_api_key, upload_form
from api.responses import UPLOAD_ERRORS, errors, status_of
from services.ecg.preprocess import prepare_signal
from services.ecg.upload import ACCEPTED_UPLOADS
from services.inference.predict import upload_neighbours
from services.inference.sessions import Timing, requested_model
from services.inference.uploads import SeveralRecordsError, Upload, read_one_record

router = APIRouter(prefix="/ecg", tags=["inference"])

MAX_PREVIEW_S = 60.0


class Signal(BaseModel):
    """Leads sampled at ``fs``: one list of mV values per lead, in the order of ``leads``."""

    leads: list[str]
    fs: float = Field(description="sampling rate in Hz")
    unit: str = "mV"
    samples: list[list[float | None]] = Field(
        description="per lead, the first `seconds` of the signal in mV (null: a NaN or infinite sample)"
    )


class PreviewResponse(BaseModel):
    model: str = Field(description="'name@version' whose input spec made `preprocessed`")
    source: str
    duration_s: float = Field(description="the whole record's duration (the signals are cut to `seconds`)")
    seconds: float = Field(description="seconds of signal returned")
    read: Signal = Field(description="the leads as read from the file, at the file's rate, in mV")
    preprocessed: Signal = Field(
        description="the model's leads at its rate, band-passed: what its windows are cut from (before the "
        "per-window standardisation)"
    )


class NeighbourOut(BaseModel):
    record_id: str = Field(description="the reference record (its id in the dataset the set was made from)")
    labels: list[str]
    distance: float = Field(description="distance of the embeddings, in the reference set's metric")


class NeighboursResponse(BaseModel):
    model: str
    dataset: str = Field(description="where the reference records come from (their training split)")
    metric: str
    neighbours: list[NeighbourOut] = Field(description="nearest first")


def _signal(x: np.ndarray, leads: list[str], fs: float, seconds: float) -> Signal:
    """The first ``seconds`` of ``x`` (mV, rounded to 0.1 µV); a NaN or infinite sample (in a lead the model
    does not use: its own are checked) is null."""
    kept = np.round(np.asarray(x[:, : int(round(seconds * fs))], dtype=np.float64), 4)
    samples = kept.tolist()
    if not np.isfinite(kept).all():
        samples = [[v if math.isfinite(v) else None for v in row] for row in samples]
    return Signal(leads=leads, fs=fs, samples=samples)


@router.post(
    "/preview",
    response_model=PreviewResponse,
    dependencies=[Depends(require_api_key)],
    responses=errors(*UPLOAD_ERRORS),
    summary="An ECG's leads as read (mV, the file's rate) and as preprocessed for a model (for plotting)",
    description=f"Upload {ACCEPTED_UPLOADS}, as for POST /predict. The answer holds the first `seconds` of "
    "the record twice: as read, and through the model's preprocessing (its leads, resampled to its rate, "
    "band-passed), the one path training and serving use.",
)
def preview(
    session: SessionDep,
    upload: Upload = Depends(upload_form()),
    seconds: float = Query(10.0, gt=0, le=MAX_PREVIEW_S, description="seconds of signal to return"),
) -> PreviewResponse:
    served = requested_model(session, upload.model)
    try:
        recording = read_one_record(served, upload, "sliding", Timing())
    except SeveralRecordsError as exc:
        raise HTTPException(status_of(exc), f"{exc}: POST /ecg/preview takes one record") from None
    prepared = prepare_signal(recording, served.spec)
    return PreviewResponse(
        model=served.ref,
        source=recording.source,
        duration_s=round(recording.duration_s, 3),
        seconds=min(seconds, recording.duration_s),
        read=_signal(recording.signal, recording.lead_names, recording.fs, seconds),
        preprocessed=_signal(prepared, list(served.spec.leads), served.spec.fs, seconds),
    )


@router.post(
    "/neighbours",
    response_model=NeighboursResponse,
    dependencies=[Depends(require_api_key)],
    responses=errors(*UPLOAD_ERRORS, (409, "the model has no kNN reference set")),
    summary="The reference records nearest to an ECG in a model's embedding space, with their labels",
    description=f"Upload {ACCEPTED_UPLOADS}. The record is embedded as POST /predict?method=knn embeds it "
    "and compared with the version's stored reference set (its training-split records).",
)
def neighbours(
    session: SessionDep,
    upload: Upload = Depends(upload_form()),
    count: int = Query(5, ge=1, le=50, description="how many neighbours"),
) -> NeighboursResponse:
    try:
        served, found = upload_neighbours(session, upload, count, Timing())
    except SeveralRecordsError as exc:
        raise HTTPException(status_of(exc), f"{exc}: POST /ecg/neighbours takes one record") from None
    reference = served.knn_reference or {}
    return NeighboursResponse(
        model=served.ref,
        dataset=reference.get("dataset", ""),
        metric=reference.get("metric", ""),
        neighbours=[NeighbourOut(record_id=n.record_id, labels=n.labels, distance=n.distance) for n in found],
    )
