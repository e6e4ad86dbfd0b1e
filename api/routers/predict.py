"""Diagnosis probabilities of an uploaded ECG: a diagnosis model's head, or kNN against a reference set."""

import time

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from api.deps import SessionDep, require_api_key, upload_form
from api.responses import UPLOAD_ERRORS, errors, server_timing, status_of
from api.schemas import KnnInfo, PredictResponse, RecordInfo
from services.ecg.preprocess import Reading
from services.ecg.upload import ACCEPTED_UPLOADS
from services.inference.predict import PredictMethod, PredictWindowing, predict_upload
from services.inference.sessions import Timing
from services.inference.uploads import SeveralRecordsError, Upload

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
    session: SessionDep,
    response: Response,
    upload: Upload = Depends(upload_form()),
    method: PredictMethod | None = Query(
        None, description="head or knn; default: head where the model has one, else knn"
    ),
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
) -> PredictResponse:
    started, timing = time.perf_counter(), Timing()
    try:
        predicted = predict_upload(
            session, upload, method, Reading(windowing, pad, interpolate_nan), timing=timing
        )
    except SeveralRecordsError as exc:
        raise HTTPException(status_of(exc), f"{exc}: POST /predict takes one record") from None
    response.headers["Server-Timing"] = server_timing(timing, time.perf_counter() - started)
    how, probabilities = predicted.how, predicted.result.probabilities
    reference = predicted.model.knn_reference if how.method == "knn" else None
    return PredictResponse(
        model=predicted.model.name,
        version=predicted.model.version,
        method=how.method,
        classes=list(how.class_names),
        probabilities={c: float(p) for c, p in zip(how.class_names, probabilities, strict=True)},
        thresholds=dict(zip(how.class_names, how.thresholds, strict=True)),
        labels=how.labels(probabilities),
        record=RecordInfo.of(predicted.recording, predicted.result.windows),
        knn=KnnInfo(
            k=reference["k"],
            metric=reference["metric"],
            reference_records=reference["records"],
            dataset=reference["dataset"],
        )
        if reference
        else None,
        variant=predicted.variant,
        provider=predicted.provider,
    )
