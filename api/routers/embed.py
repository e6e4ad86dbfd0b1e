"""Embeddings of uploaded ECGs from the registered ONNX encoders: one record, or several in one request."""

import tempfile
import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from sqlalchemy.orm import Session

from api.deps import db_session, require_api_key
from api.responses import UPLOAD_ERRORS, errors
from api.schemas import EmbedBatchResponse, EmbedResponse, RecordInfo, RecordResult
from services.ecg.recording import ReadLimits, Recording
from services.ecg.upload import ACCEPTED_UPLOADS, read_upload
from services.errors import ClientError
from services.inference.embed import SESSIONS, Embedded, ServedModel, Timing, embed_recordings, resolve_served
from services.inference.sessions import Precision
from services.inference.uploads import batch_records, read_records, request_limits

router = APIRouter(tags=["inference"])


def read_files(files: list[UploadFile]) -> dict[str, bytes]:
    """File name -> content. The body's size was bounded before it was read (``api.guard``)."""
    contents: dict[str, bytes] = {}
    for upload in files:
        name = Path(upload.filename or "").name
        if not name:
            raise ClientError("an uploaded file has no file name")
        if name in contents:
            raise ClientError(f"file '{name}' was uploaded twice")
        contents[name] = upload.file.read()
    return contents


def one_record_upload(files: list[UploadFile], refusal: str) -> dict[str, bytes]:
    """The uploaded files of one record; several WFDB headers are refused with ``refusal`` appended."""
    contents = read_files(files)
    headers = [name for name in contents if name.lower().endswith(".hea")]
    if len(headers) > 1:
        raise ClientError(f"several WFDB headers uploaded ({', '.join(headers)}): {refusal}")
    return contents


def lead_names(leads: str | None) -> list[str] | None:
    """The lead names of the comma-separated ``leads`` form field (None when not given)."""
    return [name.strip() for name in leads.split(",")] if leads else None


def read_recording(
    contents: dict[str, bytes], fs: float | None, leads: str | None, limits: ReadLimits, timing: Timing
) -> Recording:
    """The one record of an upload, read in mV under the request's ``limits`` (``request_limits``);
    ``leads`` is the comma-separated form field."""
    with timing.step("read"), tempfile.TemporaryDirectory(prefix="ecgssl-upload-") as workdir:
        return read_upload(contents, Path(workdir), fs=fs, lead_names=lead_names(leads), limits=limits)


def served_model(session: Session, ref: str | None) -> ServedModel:
    """The version ``ref`` names, detached; the database connection goes back to the pool at once."""
    served = resolve_served(session, ref)
    session.close()  # inference needs no database: do not hold a pooled connection through it
    return served


def record_info(recording: Recording, windows: int) -> RecordInfo:
    return RecordInfo(
        source=recording.source,
        fs=recording.fs,
        duration_s=round(recording.duration_s, 3),
        channels=recording.lead_names,
        windows=windows,
    )


def server_timing(response: Response, timing: Timing, started: float) -> None:
    """``Server-Timing`` (ms): session run(s), longest queue wait, resolve (registry), read (upload), prep
    (checks and windows), and app: the handler's whole time."""
    response.headers["Server-Timing"] = timing.header(time.perf_counter() - started)


FILES_DESCRIPTION = "WFDB .hea plus its .dat/.mat files, or one .zip, .edf, .bdf, .npy, .npz, .csv, .json"
MODEL_DESCRIPTION = (
    "'name@version' (pinned), 'name@alias' or 'name' (its 'production' alias: the first version registered "
    "under a name gets it, a later one serves only once promoted with PUT /models/{name}/aliases/production; "
    "never simply the newest version). Default: the ECGSSL_DEFAULT_MODEL setting, else the 'production' "
    "alias of the shipped model (registered on first start), else of the first model registered"
)
PRECISION_DESCRIPTION = (
    "ONNX variant: fp32 (exact), int8 (CPU) or fp16 (CUDA), refused with the reason when the version's "
    "variant did not pass its check; default: the ECGSSL_SERVE_PRECISION setting (auto)"
)


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
    response: Response,
    files: list[UploadFile] = File(..., description=FILES_DESCRIPTION),
    fs: float | None = Form(
        None,
        gt=0,
        allow_inf_nan=False,
        description="sampling rate in Hz: needed for .npy, and for .npz/.csv/.json without one",
    ),
    leads: str | None = Form(
        None, description="comma-separated lead names of the rows/columns (.npy, .npz, .csv, .json)"
    ),
    model: str | None = Query(None, description=MODEL_DESCRIPTION),
    precision: Precision | None = Query(None, description=PRECISION_DESCRIPTION),
    windowing: Literal["sliding", "center"] = Query(
        "sliding", description="longer records: mean over sliding windows, or one centre crop"
    ),
    pad: bool = Query(False, description="zero-pad a record shorter than the model's window"),
    interpolate_nan: bool = Query(
        False, description="fill NaN/inf samples by linear interpolation instead of refusing the record"
    ),
    session: Session = Depends(db_session),
) -> EmbedResponse:
    started = time.perf_counter()
    timing = Timing()
    with timing.step("resolve"):
        served = served_model(session, model)
    contents = one_record_upload(
        files,
        "POST /embed takes one record; POST /embed/batch takes several and answers one result per record",
    )
    with SESSIONS.lease(served, precision, strict=precision is not None) as loaded:
        recording = read_recording(contents, fs, leads, request_limits(served.spec, windowing), timing)
        (result,) = embed_recordings(
            loaded, [recording], windowing=windowing, pad=pad, interpolate_nan=interpolate_nan, timing=timing
        )
    if isinstance(result, ClientError):
        raise result
    server_timing(response, timing, started)
    return EmbedResponse(
        model=served.name,
        version=served.version,
        dimension=int(result.vector.shape[0]),
        embedding=result.vector.astype(float).tolist(),
        record=record_info(recording, result.windows),
        variant=loaded.variant,
        provider=loaded.provider,
    )


def no_record_embedded(results: list[RecordResult]) -> ClientError:
    """The request's 4xx when none of its records could be read and embedded: each record's reason; the
    status the records share (e.g. 413 for all too large), else 422."""
    reasons = "; ".join(f"[{r.index}] {r.source} ({r.status_code}): {r.error}" for r in results)
    error = ClientError(
        f"no record of the upload could be read and embedded ({len(results)} record(s)): {reasons}; "
        f"expected {ACCEPTED_UPLOADS}"
    )
    codes = {r.status_code for r in results}
    error.status_code = codes.pop() if len(codes) == 1 else 422
    return error


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
    response: Response,
    files: list[UploadFile] = File(..., description="the records' files (see above)"),
    fs: float | None = Form(
        None, gt=0, allow_inf_nan=False, description="sampling rate in Hz for records that do not carry one"
    ),
    leads: str | None = Form(None, description="comma-separated lead names for .npy/.npz/.csv/.json records"),
    model: str | None = Query(None, description=MODEL_DESCRIPTION),
    precision: Precision | None = Query(None, description=PRECISION_DESCRIPTION),
    windowing: Literal["sliding", "center"] = Query("sliding", description="as for POST /embed"),
    pad: bool = Query(False, description="as for POST /embed"),
    interpolate_nan: bool = Query(False, description="as for POST /embed"),
    session: Session = Depends(db_session),
) -> EmbedBatchResponse:
    started = time.perf_counter()
    timing = Timing()
    with timing.step("resolve"):
        served = served_model(session, model)
    contents = read_files(files)
    with timing.step("read"), tempfile.TemporaryDirectory(prefix="ecgssl-upload-") as workdir:
        groups = batch_records(contents, Path(workdir))
        limits = request_limits(served.spec, windowing)
        recordings = read_records(groups, Path(workdir), fs, lead_names(leads), limits)
    with SESSIONS.lease(served, precision, strict=precision is not None) as loaded:
        results = embed_recordings(
            loaded, recordings, windowing=windowing, pad=pad, interpolate_nan=interpolate_nan, timing=timing
        )
    out = []
    for index, (group, recording, result) in enumerate(zip(groups, recordings, results, strict=True)):
        if isinstance(result, Embedded):
            out.append(
                RecordResult(
                    index=index,
                    source=group.label,
                    ok=True,
                    status_code=200,
                    dimension=int(result.vector.shape[0]),
                    embedding=result.vector.astype(float).tolist(),
                    record=record_info(recording, result.windows),
                )
            )
        else:
            out.append(
                RecordResult(
                    index=index,
                    source=group.label,
                    ok=False,
                    status_code=result.status_code,
                    error=str(result),
                )
            )
    if not any(r.ok for r in out):
        raise no_record_embedded(out)
    server_timing(response, timing, started)
    return EmbedBatchResponse(
        model=served.name,
        version=served.version,
        variant=loaded.variant,
        provider=loaded.provider,
        records=out,
    )
