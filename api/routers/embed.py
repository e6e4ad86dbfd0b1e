"""Embeddings of uploaded ECGs from the registered ONNX encoders: one record, or several in one request."""

import time
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from api.deps import SessionDep, require_api_key, upload_form
from api.responses import UPLOAD_ERRORS, errors, server_timing, status_of
from api.schemas import EmbedBatchResponse, EmbedResponse, RecordInfo, RecordResult
from services.ecg.preprocess import Reading
from services.ecg.upload import ACCEPTED_UPLOADS
from services.errors import ClientError
from services.inference import embed as embedding
from services.inference.embed import NoRecordEmbedded, RecordOutcome, Timing
from services.inference.uploads import SeveralRecordsError, Upload

router = APIRouter(tags=["inference"])


Windowing = Literal["sliding", "center"]


@router.post(
    "/embed",
    response_model=EmbedResponse,
    dependencies=[Depends(require_api_key)],
    responses=errors(*UPLOAD_ERRORS),
    summary="Embed one ECG: WFDB (.hea + .dat/.mat, or zipped), EDF/BDF, .npy, .npz, CSV or JSON",
    description=f"Upload {ACCEPTED_UPLOADS}. Signals are read in mV (units in the file are converted). "
    "Several records in one request: POST /embed/batch. The `Server-Timing` header gives the session time. "
    "413 for a body over ECGSSL_UPLOAD_MAX_BYTES, a record longer than ECGSSL_UPLOAD_MAX_SECONDS or more "
    "model windows than ECGSSL_SERVE_MAX_WINDOWS (checked from the header, before the samples are read).",
)
def embed(
    session: SessionDep,
    response: Response,
    upload: Upload = Depends(upload_form()),
    windowing: Windowing = Query(
        "sliding", description="longer records: mean over sliding windows, or one centre crop"
    ),
    pad: bool = Query(False, description="zero-pad a record shorter than the model's window"),
    interpolate_nan: bool = Query(
        False, description="fill NaN/inf samples by linear interpolation instead of refusing the record"
    ),
) -> EmbedResponse:
    started, timing = time.perf_counter(), Timing()
    try:
        embedded = embedding.embed_upload(
            session, upload, Reading(windowing, pad, interpolate_nan), timing=timing
        )
    except SeveralRecordsError as exc:
        raise HTTPException(
            status_of(exc),
            f"{exc}: POST /embed takes one record; POST /embed/batch takes several and answers one result "
            "per record",
        ) from None
    response.headers["Server-Timing"] = server_timing(timing, time.perf_counter() - started)
    (record,) = embedded.records
    return EmbedResponse(
        model=embedded.model.name,
        version=embedded.model.version,
        dimension=int(record.result.vector.shape[0]),
        embedding=record.result.vector.astype(float).tolist(),
        record=RecordInfo.of(record.recording, record.result.windows),
        variant=embedded.variant,
        provider=embedded.provider,
    )


@router.post(
    "/embed/batch",
    response_model=EmbedBatchResponse,
    dependencies=[Depends(require_api_key)],
    responses=errors(*UPLOAD_ERRORS),
    summary="Embed several ECGs in one request: one result per record, in order, with per-record errors",
    description=(
        "Upload several records: WFDB files (each .hea with the signal files it names; grouped by record), "
        "one or more .zip archives holding one or more records each, and/or single-file records (.edf, "
        ".bdf, .npy, .npz, .csv, .json; `fs` and `leads` apply to all of them). The answer has one entry per "
        "record in upload order: its embedding, or `ok: false` with the 4xx status and message that record "
        "alone would get from POST /embed (e.g. 413 for a record longer than ECGSSL_UPLOAD_MAX_SECONDS). The "
        "request itself fails (4xx) only when it cannot be served at all: unknown model, no record, no "
        "record that could be read and embedded (the message gives each record's reason), or over a limit "
        "of the request (413): a body over ECGSSL_UPLOAD_MAX_BYTES, more than ECGSSL_SERVE_MAX_RECORDS "
        "records (each record in a .zip counts), records giving more than ECGSSL_SERVE_MAX_WINDOWS model "
        "windows together (counted from their headers, before their samples are read)."
    ),
)
def embed_batch(
    session: SessionDep,
    response: Response,
    upload: Upload = Depends(
        upload_form(
            "the records' files (see above)",
            "sampling rate in Hz for records that do not carry one",
            "comma-separated lead names for .npy/.npz/.csv/.json records",
        )
    ),
    windowing: Windowing = Query("sliding", description="as for POST /embed"),
    pad: bool = Query(False, description="as for POST /embed"),
    interpolate_nan: bool = Query(False, description="as for POST /embed"),
) -> EmbedBatchResponse:
    started, timing = time.perf_counter(), Timing()
    try:
        embedded = embedding.embed_batch(
            session, upload, Reading(windowing, pad, interpolate_nan), timing=timing
        )
    except NoRecordEmbedded as exc:
        raise no_record_embedded([record_result(i, r) for i, r in enumerate(exc.records)]) from None
    response.headers["Server-Timing"] = server_timing(timing, time.perf_counter() - started)
    return EmbedBatchResponse(
        model=embedded.model.name,
        version=embedded.model.version,
        variant=embedded.variant,
        provider=embedded.provider,
        records=[record_result(i, r) for i, r in enumerate(embedded.records)],
    )


def record_result(index: int, record: RecordOutcome) -> RecordResult:
    """One record's entry of a batch: its embedding, or its error with the status it alone would get."""
    result = record.result
    if isinstance(result, ClientError):
        return RecordResult(
            index=index, source=record.source, ok=False, status_code=status_of(result), error=str(result)
        )
    return RecordResult(
        index=index,
        source=record.source,
        ok=True,
        status_code=200,
        dimension=int(result.vector.shape[0]),
        embedding=result.vector.astype(float).tolist(),
        record=RecordInfo.of(record.recording, result.windows),
    )


def no_record_embedded(results: list[RecordResult]) -> HTTPException:
    """The request's 4xx when none of its records could be read and embedded: each record's reason; the
    status the records share (e.g. 413 for all too large), else 422."""
    reasons = "; ".join(f"[{r.index}] {r.source} ({r.status_code}): {r.error}" for r in results)
    codes = {r.status_code for r in results}
    return HTTPException(
        codes.pop() if len(codes) == 1 else 422,
        f"no record of the upload could be read and embedded ({len(results)} record(s)): {reasons}; "
        f"expected {ACCEPTED_UPLOADS}",
    )
