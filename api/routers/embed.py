"""Embeddings of uploaded ECGs from the registered ONNX encoders."""

import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from sqlalchemy.orm import Session

from api.deps import db_session, require_api_key
from api.schemas import EmbedResponse, RecordInfo
from services.config import get_settings
from services.ecg.preprocess import InputSpec, model_recording
from services.ecg.recording import ACCEPTED_UPLOADS, read_upload
from services.errors import ClientError
from services.inference.embed import ServedModel, embed_recording
from services.registry import resolve_model_version

router = APIRouter(tags=["inference"])


class UploadTooLarge(ClientError):
    status_code = 413


def read_files(request: Request, files: list[UploadFile]) -> dict[str, bytes]:
    """File name -> content, refusing uploads over the configured size."""
    limit = get_settings().upload_max_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise UploadTooLarge(f"upload of {declared} bytes is over the limit of {limit} bytes")
    contents: dict[str, bytes] = {}
    total = 0
    for upload in files:
        name = Path(upload.filename or "").name
        if not name:
            raise ClientError("an uploaded file has no file name")
        if name in contents:
            raise ClientError(f"file '{name}' was uploaded twice")
        data = upload.file.read(limit - total + 1)
        total += len(data)
        if total > limit:
            raise UploadTooLarge(f"upload is over the limit of {limit} bytes")
        contents[name] = data
    return contents


def served_model(session: Session, ref: str | None) -> ServedModel:
    version = resolve_model_version(session, ref)
    return ServedModel(
        version_id=version.id,
        name=version.model.name,
        version=version.version,
        onnx_path=version.onnx_path,
        sha256=version.sha256,
        spec=InputSpec.from_dict(version.input_spec),
        embedding_dim=version.embedding_dim,
        clinical_normaliser=version.clinical_normaliser,
    )


@router.post(
    "/embed",
    response_model=EmbedResponse,
    dependencies=[Depends(require_api_key)],
    summary="Embed one ECG: WFDB (.hea + .dat/.mat, or zipped), EDF/BDF, .npy, .npz, CSV or JSON",
    description=f"Upload {ACCEPTED_UPLOADS}. Signals are read in mV (units in the file are converted).",
)
def embed(
    request: Request,
    files: list[UploadFile] = File(
        ...,
        description="WFDB .hea plus its .dat/.mat files, or one .zip, .edf, .bdf, .npy, .npz, .csv, .json",
    ),
    fs: float | None = Form(
        None, gt=0, description="sampling rate in Hz: needed for .npy, and for .npz/.csv/.json without one"
    ),
    leads: str | None = Form(
        None, description="comma-separated lead names of the rows/columns (.npy, .npz, .csv, .json)"
    ),
    model: str | None = Query(None, description="'name' or 'name@version'; default the newest model"),
    windowing: Literal["sliding", "center"] = Query(
        "sliding", description="longer records: mean over sliding windows, or one centre crop"
    ),
    pad: bool = Query(False, description="zero-pad a record shorter than the model's window"),
    interpolate_nan: bool = Query(
        False, description="fill NaN/inf samples by linear interpolation instead of refusing the record"
    ),
    session: Session = Depends(db_session),
) -> EmbedResponse:
    served = served_model(session, model)
    contents = read_files(request, files)
    lead_names = [name.strip() for name in leads.split(",")] if leads else None
    with tempfile.TemporaryDirectory(prefix="ecgssl-upload-") as workdir:
        recording = read_upload(contents, Path(workdir), fs=fs, lead_names=lead_names)
    # the model's leads, checked: NaN/inf refused or interpolated, an all-flat record refused
    model_input = model_recording(recording, served.spec, interpolate_nan=interpolate_nan, reject_flat=True)
    vector, n_windows = embed_recording(served, model_input, windowing=windowing, pad=pad)
    return EmbedResponse(
        model=served.name,
        version=served.version,
        dimension=int(vector.shape[0]),
        embedding=vector.astype(float).tolist(),
        record=RecordInfo(
            source=recording.source,
            fs=recording.fs,
            duration_s=round(recording.duration_s, 3),
            channels=recording.lead_names,
            windows=n_windows,
        ),
    )
