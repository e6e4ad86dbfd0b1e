"""Embeddings of recordings from exported ONNX encoders (sessions, variants and batching: ``sessions``).

A recording is cut into the model's windows by the one preprocessing function; the windows go through
the version's micro-batched session, and the embedding is their mean. A hybrid model's embedding is the
encoder's followed by the record's normalised clinical measurements and their missing flags, measured at
the record's own rate. ``embed_upload`` and ``embed_batch`` serve a request: the model it names, its
upload's record(s) read under the request's limits, and their embeddings.
"""

import contextlib
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from services.ecg.clinical import FeatureNormaliser, clinical_features
from services.ecg.preprocess import Reading, model_recording, preprocess
from services.ecg.recording import Recording
from services.errors import ClientError
from services.inference.sessions import (
    SESSIONS,
    LoadedModel,
    ServedModel,
    SessionCache,
    Timing,
    requested_model,
    resolve_served,
)
from services.inference.uploads import Upload, batch_recordings, leased_record

__all__ = [
    "SESSIONS",
    "Embedded",
    "LoadedModel",
    "NoRecordEmbedded",
    "RecordOutcome",
    "ServedModel",
    "SessionCache",
    "Timing",
    "UploadEmbeddings",
    "embed_batch",
    "embed_recordings",
    "embed_upload",
    "resolve_served",
]


@dataclass
class Embedded:
    """One record's embedding and the number of windows averaged into it."""

    vector: np.ndarray
    windows: int


def _with_clinical(model: ServedModel, recording: Recording, vector: np.ndarray) -> np.ndarray:
    if model.clinical_normaliser is None:
        return vector
    normaliser = FeatureNormaliser.from_dict(model.clinical_normaliser)
    clinical = normaliser.transform_stacked(clinical_features(recording)[None])[0]  # (2F,)
    return np.concatenate([vector, clinical])


def embed_recordings(
    loaded: LoadedModel,
    recordings: list[Recording | ClientError],
    reading: Reading = Reading(),
    timing: Timing | None = None,
) -> list[Embedded | ClientError]:
    """Embed several recordings on a leased session: one result or error per recording, in order.

    Each recording is checked (``model_recording``: NaN refused or interpolated, flat refused) and cut into
    windows; all are submitted before any result is awaited, so they share batched runs. A recording that
    fails (at reading, preprocessing or in its run) gets its error; the others are unaffected.
    """
    model = loaded.model
    pending: list = []
    for recording in recordings:
        if isinstance(recording, ClientError):
            pending.append(recording)
            continue
        try:
            with timing.step("prep") if timing is not None else contextlib.nullcontext():
                checked = model_recording(
                    recording, model.spec, interpolate_nan=reading.interpolate_nan, reject_flat=True
                )
                windows = preprocess(checked, model.spec, windowing=reading.windowing, pad=reading.pad)
            pending.append((checked, len(windows), loaded.submit(windows)))
        except ClientError as exc:
            pending.append(exc)
    results: list[Embedded | ClientError] = []
    for item in pending:
        if isinstance(item, ClientError):
            results.append(item)
            continue
        checked, n_windows, run = item
        try:
            (out,) = run.result(timing)
            results.append(Embedded(_with_clinical(model, checked, out.mean(axis=0)), n_windows))
        except ClientError as exc:
            results.append(exc)
        except Exception as exc:  # a run that fails on this record alone (the batcher isolated it)
            results.append(ClientError(f"{checked.source}: the model could not run on this record ({exc})"))
    return results


@dataclass
class RecordOutcome:
    """One record of an upload: its name, the recording as read (None when it could not be read), and its
    embedding, or the error that record alone would have got."""

    source: str
    recording: Recording | None
    result: Embedded | ClientError


@dataclass
class UploadEmbeddings:
    """The records of one upload embedded by one model version, and the session variant that ran them."""

    model: ServedModel
    variant: str
    provider: str
    records: list[RecordOutcome]


class NoRecordEmbedded(ClientError):
    """No record of a batch could be read and embedded; ``records`` carries each one's error."""

    def __init__(self, records: list[RecordOutcome]):
        super().__init__(f"no record of the upload could be read and embedded ({len(records)} record(s))")
        self.records = records


def embed_upload(
    session: Session, upload: Upload, reading: Reading = Reading(), *, timing: Timing
) -> UploadEmbeddings:
    """The embedding of the one record of ``upload`` by the model it names; the record's error is raised."""
    served = requested_model(session, upload.model, timing)
    with leased_record(served, upload, reading.windowing, timing) as (loaded, recording):
        (result,) = embed_recordings(loaded, [recording], reading, timing)
    if isinstance(result, ClientError):
        raise result
    return UploadEmbeddings(
        served, loaded.variant, loaded.provider, [RecordOutcome(recording.source, recording, result)]
    )


def embed_batch(
    session: Session, upload: Upload, reading: Reading = Reading(), *, timing: Timing
) -> UploadEmbeddings:
    """The embeddings of every record of ``upload``, in upload order, each with its own error where it has
    one; ``NoRecordEmbedded`` when none could be embedded. Limits of the request (its records, their model
    windows, a zip's expanded size) fail it as a whole (``TooLargeError``)."""
    served = requested_model(session, upload.model, timing)
    groups, recordings = batch_recordings(served, upload, reading.windowing, timing)
    with SESSIONS.lease(served, upload.precision, strict=upload.precision is not None) as loaded:
        results = embed_recordings(loaded, recordings, reading, timing)
    records = [
        RecordOutcome(group.label, recording if isinstance(recording, Recording) else None, result)
        for group, recording, result in zip(groups, recordings, results, strict=True)
    ]
    if not any(isinstance(record.result, Embedded) for record in records):
        raise NoRecordEmbedded(records)
    return UploadEmbeddings(served, loaded.variant, loaded.provider, records)
