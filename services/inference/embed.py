"""Embeddings of recordings from exported ONNX encoders (sessions, variants and batching: ``sessions``).

A recording is cut into the model's windows by the one preprocessing function; the windows go through
the version's micro-batched session, and the embedding is their mean. A hybrid model's embedding is the
encoder's followed by the record's normalised clinical measurements and their missing flags, measured at
the record's own rate.
"""

import contextlib
from dataclasses import dataclass

import numpy as np

from services.ecg.clinical import FeatureNormaliser, clinical_features
from services.ecg.preprocess import Windowing, model_recording, preprocess
from services.ecg.recording import Recording
from services.errors import ClientError
from services.inference.sessions import (
    SESSIONS,
    LoadedModel,
    ServedModel,
    SessionCache,
    Timing,
    resolve_served,
)

__all__ = [
    "SESSIONS",
    "Embedded",
    "LoadedModel",
    "ServedModel",
    "SessionCache",
    "Timing",
    "embed_recordings",
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
    *,
    windowing: Windowing = "sliding",
    pad: bool = False,
    interpolate_nan: bool = False,
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
                    recording, model.spec, interpolate_nan=interpolate_nan, reject_flat=True
                )
                windows = preprocess(checked, model.spec, windowing=windowing, pad=pad)
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
