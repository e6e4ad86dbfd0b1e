"""Diagnosis probabilities of an uploaded ECG: a diagnosis model's head, or kNN against a reference set."""

import time

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from sqlalchemy.orm import Session

from api.deps import db_session, require_api_key
from api.responses import UPLOAD_ERRORS, errors
from api.routers.embed import (
    FILES_DESCRIPTION,
    MODEL_DESCRIPTION,
    PRECISION_DESCRIPTION,
    one_record_upload,
    read_recording,
    record_info,
    served_model,
    server_timing,
)
from api.schemas import KnnInfo, PredictResponse
from services.ecg.upload import ACCEPTED_UPLOADS
from services.errors import ClientError
from services.inference.predict import PredictMethod, PredictWindowing, classifier, predict_recordings
from services.inference.sessions import SESSIONS, Precision, Timing
from services.inference.uploads import request_limits

router = APIRouter(tags=["inference"])


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_api_key)],
    responses=errors(
        *UPLOAD_ERRORS, (409, "the model can do neither method asked (no head, no kNN reference set)")
    ),
    summary="Diagnosis probabilities of one ECG (PTB-XL superclasses for models fine-tuned on PTB-XL)",
    description=f"Upload {ACCEPTED_UPLOADS}, as for POST /embed. `method=head` (the default for diagnosis "
    "models, made by POST /jobs/finetune with method linear_probe or finetune): the model's own head, "
    "probabilities averaged over the record's windows: 3 crops of each 10-s segment, as the job's test "
    "metrics and thresholds were computed (a longer record: the mean over its 10-s segments). `method=knn` "
    "(the default for other models that have a reference set): the record's embedding, averaged the same "
    "way, votes with its k nearest labelled training records, "
    "stored by fine-tuning jobs and by POST /jobs/evaluate with the knn protocol. Classes are independent "
    "(multi-label); `labels` are those at or above their validation-tuned threshold. A model that can do "
    "neither gets 409 with what to do.",
)
def predict(
    response: Response,
    files: list[UploadFile] = File(..., description=FILES_DESCRIPTION),
    fs: float | None = Form(
        None, gt=0, description="sampling rate in Hz: needed for .npy, and for .npz/.csv/.json without one"
    ),
    leads: str | None = Form(
        None, description="comma-separated lead names of the rows/columns (.npy, .npz, .csv, .json)"
    ),
    model: str | None = Query(None, description=MODEL_DESCRIPTION),
    method: PredictMethod | None = Query(
        None, description="head or knn; default: head where the model has one, else knn"
    ),
    precision: Precision | None = Query(None, description=PRECISION_DESCRIPTION),
    windowing: PredictWindowing = Query(
        "three_crop",
        description="how a record is read, the one way the jobs read it when they tuned the thresholds and "
        "stored the kNN reference set: each 10-s segment (the remainder dropped) through 3 crops (starts "
        "0, 0.5 and 1 s), averaged, then the mean over the segments; 3 windows for a 10-s record",
    ),
    pad: bool = Query(False, description="zero-pad a record shorter than the model's window"),
    interpolate_nan: bool = Query(
        False, description="fill NaN/inf samples by linear interpolation instead of refusing the record"
    ),
    session: Session = Depends(db_session),
) -> PredictResponse:
    started = time.perf_counter()
    timing = Timing()
    with timing.step("resolve"):
        served = served_model(session, model)
    how = classifier(served, method)  # 409 before reading the upload when the model cannot predict
    contents = one_record_upload(files, "POST /predict takes one record")
    with SESSIONS.lease(served, precision, strict=precision is not None) as loaded:
        recording = read_recording(contents, fs, leads, request_limits(served.spec, windowing), timing)
        (result,) = predict_recordings(
            loaded,
            [recording],
            how,
            windowing=windowing,
            pad=pad,
            interpolate_nan=interpolate_nan,
            timing=timing,
        )
    if isinstance(result, ClientError):
        raise result
    server_timing(response, timing, started)
    reference = served.knn_reference if how.method == "knn" else None
    return PredictResponse(
        model=served.name,
        version=served.version,
        method=how.method,
        classes=list(how.class_names),
        probabilities={c: float(p) for c, p in zip(how.class_names, result.probabilities, strict=True)},
        thresholds=dict(zip(how.class_names, how.thresholds, strict=True)),
        labels=how.labels(result.probabilities),
        record=record_info(recording, result.windows),
        knn=KnnInfo(
            k=reference["k"],
            metric=reference["metric"],
            reference_records=reference["records"],
            dataset=reference["dataset"],
        )
        if reference
        else None,
        variant=loaded.variant,
        provider=loaded.provider,
    )
