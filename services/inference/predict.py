"""Diagnosis probabilities of recordings from a registered version, by one of two methods.

- ``head``: a diagnosis model (``model_versions.head``; made by linear_probe / finetune jobs) whose ONNX
  graph outputs ``probabilities`` (B, K) (sigmoid per class);
- ``knn``: any embedding model with a stored reference set (``model_versions.knn_reference``: training-split
  embeddings and multi-hot labels, kept by every fine-tuning job and by evaluation jobs with the ``knn``
  protocol): a record's embedding votes with its k nearest reference records; a class's probability is the
  fraction of them that carry it.

Either way a record is read as the jobs read their records when they tuned the thresholds and computed the
reference embeddings (``preprocess(..., windowing="three_crop")``): each 10-s segment (non-overlapping, the
remainder dropped, as the cache cuts records) through ST-MEM's 3 test-time crops (starts 0/125/250 of a
2500-sample segment), averaged, then the mean over the record's segments; for kNN that mean embedding
(followed, for a hybrid version, by the clinical measurements, as evaluation jobs append them). A 10-s
record gives 3 windows, a 38.4-s one 9 (3 segments). A record shorter than 10 s is one segment of its own
length (the jobs never saw such records).

The classes are independent (multi-label): probabilities need not sum to 1, and a class is predicted when
its probability reaches the threshold tuned on the validation split (None: never).
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.neighbors import NearestNeighbors
from sqlalchemy.orm import Session

from services.ecg.preprocess import Reading, model_recording, preprocess
from services.ecg.recording import Recording
from services.errors import ClientError, ConflictError
from services.evaluation.metrics import knn_scores
from services.export.contract import PROBABILITIES_NAME
from services.inference.embed import Embedded, embed_recordings
from services.inference.sessions import LoadedModel, ModelUnavailable, ServedModel, Timing, requested_model
from services.inference.uploads import Upload, leased_record

PredictMethod = Literal["head", "knn"]
PredictWindowing = Literal["three_crop"]  # the jobs' test-time reading of a record (module docstring)
THREE_CROP = Reading("three_crop")

FINETUNE_HINT = "fine-tune it into a diagnosis model (POST /jobs/finetune, method linear_probe or finetune)"
REFERENCE_HINT = "store a kNN reference set for it (POST /jobs/evaluate with protocols ['knn'])"


@dataclass
class Predicted:
    """One record's class probabilities (K,) and the number of windows averaged (3 per 10-s segment)."""

    probabilities: np.ndarray
    windows: int


@dataclass(frozen=True)
class Classifier:
    """What a method predicts: class names, thresholds (None: never predicted), and its description."""

    method: PredictMethod
    class_names: tuple[str, ...]
    thresholds: tuple[float | None, ...]

    def labels(self, probabilities: np.ndarray) -> list[str]:
        return [
            name
            for name, p, t in zip(self.class_names, probabilities, self.thresholds, strict=True)
            if t is not None and p >= t
        ]


def classifier(model: ServedModel, requested: PredictMethod | None) -> Classifier:
    """The method to serve (``requested``, or the head where there is one, else kNN); 409 when the version
    cannot predict that way, with what to do about it."""
    if requested == "head" and model.head is None:
        raise ConflictError(
            f"{model.ref} has no diagnosis head (it is an embedding model): "
            + ("use method=knn (it has a kNN reference set), or " if model.knn_reference else "")
            + FINETUNE_HINT
        )
    if requested == "knn" and model.knn_reference is None:
        raise ConflictError(f"{model.ref} has no kNN reference set: {REFERENCE_HINT}")
    method = requested or ("head" if model.head else "knn" if model.knn_reference else None)
    if method is None:
        raise ConflictError(
            f"{model.ref} is an embedding model without a diagnosis head or a kNN reference set, so it "
            f"cannot predict diagnoses: {FINETUNE_HINT}, or {REFERENCE_HINT} (POST /embed serves its "
            "embeddings)"
        )
    entry = model.head if method == "head" else model.knn_reference
    return Classifier(method, tuple(entry["class_names"]), tuple(entry["thresholds"]))


@lru_cache(maxsize=16)
def _reference(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["embeddings"], data["labels"]


def load_reference(model: ServedModel) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, D), labels (N, K)) of the version's reference set (cached until its file changes)."""
    path = Path(model.knn_reference["file"])
    if not path.is_file():
        raise ModelUnavailable(
            f"the kNN reference set of {model.ref} is missing from the artifact store: {path}"
        )
    return _reference(str(path), path.stat().st_mtime_ns)


def predict_recordings(
    loaded: LoadedModel,
    recordings: list[Recording | ClientError],
    how: Classifier,
    reading: Reading = THREE_CROP,
    timing: Timing | None = None,
) -> list[Predicted | ClientError]:
    """Class probabilities of several recordings on a leased session: one result or error each, in order.
    Both methods read a record as the jobs did (module docstring); head: the mean of its windows'
    probabilities (= the mean over segments of the 3-crop means: every segment has the same crops)."""
    if how.method == "knn":
        return _knn(loaded, recordings, reading, timing)
    model, pending = loaded.model, []
    for recording in recordings:  # all submitted before any result is awaited: they share batched runs
        if isinstance(recording, ClientError):
            pending.append(recording)
            continue
        try:
            checked = model_recording(
                recording, model.spec, interpolate_nan=reading.interpolate_nan, reject_flat=True
            )
            windows = preprocess(
                checked, model.spec, windowing=reading.windowing, pad=reading.pad
            )  # (n, C, L)
            pending.append((checked.source, len(windows), loaded.submit(windows, (PROBABILITIES_NAME,))))
        except ClientError as exc:
            pending.append(exc)
    results: list[Predicted | ClientError] = []
    for item in pending:
        if isinstance(item, ClientError):
            results.append(item)
            continue
        source, n_windows, run = item
        try:
            (probabilities,) = run.result(timing)  # (n, K)
            results.append(Predicted(probabilities.mean(axis=0), n_windows))
        except ClientError as exc:
            results.append(exc)
        except Exception as exc:  # a run that fails on this record alone (the batcher isolated it): a 422
            results.append(ClientError(f"{source}: the model could not run on this record ({exc})"))
    return results


def _knn(
    loaded: LoadedModel,
    recordings: list[Recording | ClientError],
    reading: Reading,
    timing: Timing | None,
) -> list[Predicted | ClientError]:
    model, reference = loaded.model, loaded.model.knn_reference
    x, y = load_reference(model)
    embedded = embed_recordings(loaded, recordings, reading, timing)
    results: list[Predicted | ClientError] = []
    for item in embedded:
        if not isinstance(item, Embedded):
            results.append(item)
            continue
        if item.vector.shape[0] != x.shape[1]:
            raise ConflictError(
                f"the kNN reference set of {model.ref} holds {x.shape[1]}-d embeddings but the model gives "
                f"{item.vector.shape[0]}-d ones: store a new one ({REFERENCE_HINT})"
            )
        votes = knn_scores(x, y, item.vector[None].astype(np.float32), reference["k"], reference["metric"])
        results.append(Predicted(votes[0], item.windows))
    return results


@dataclass
class Prediction:
    """The prediction of one uploaded record: the version and method that made it, and the session variant
    that ran it."""

    model: ServedModel
    how: Classifier
    recording: Recording
    result: Predicted
    variant: str
    provider: str


def predict_upload(
    session: Session,
    upload: Upload,
    method: PredictMethod | None = None,
    reading: Reading = THREE_CROP,
    *,
    timing: Timing,
) -> Prediction:
    """The class probabilities of the one record of ``upload`` by the model it names (``classifier``: a
    409 before the upload is read when the model cannot predict); the record's error is raised."""
    served = requested_model(session, upload.model, timing)
    how = classifier(served, method)
    with leased_record(served, upload, reading.windowing, timing) as (loaded, recording):
        (result,) = predict_recordings(loaded, [recording], how, reading, timing)
    if isinstance(result, ClientError):
        raise result
    return Prediction(served, how, recording, result, loaded.variant, loaded.provider)


@dataclass
class Neighbour:
    """One reference record near an uploaded one: its id, labels and distance (the reference set's metric)."""

    record_id: str
    labels: list[str]
    distance: float


def nearest_references(loaded: LoadedModel, recording: Recording, count: int) -> list[Neighbour]:
    """The ``count`` reference records nearest to ``recording``'s embedding (read as for ``method=knn``:
    3 crops per 10-s segment, averaged), nearest first, with their labels; 409 without a reference set."""
    model = loaded.model
    if model.knn_reference is None:
        raise ConflictError(f"{model.ref} has no kNN reference set: {REFERENCE_HINT}")
    x, y = load_reference(model)
    with np.load(model.knn_reference["file"]) as data:
        record_ids = data["record_ids"] if "record_ids" in data.files else np.arange(len(x)).astype(str)
    (embedded,) = embed_recordings(loaded, [recording], THREE_CROP)
    if isinstance(embedded, ClientError):
        raise embedded
    if embedded.vector.shape[0] != x.shape[1]:
        raise ConflictError(
            f"the kNN reference set of {model.ref} holds {x.shape[1]}-d embeddings but the model gives "
            f"{embedded.vector.shape[0]}-d ones: store a new one ({REFERENCE_HINT})"
        )
    index = NearestNeighbors(n_neighbors=min(count, len(x)), metric=model.knn_reference["metric"]).fit(x)
    distances, found = index.kneighbors(embedded.vector[None].astype(np.float32))
    names = model.knn_reference["class_names"]
    return [
        Neighbour(str(record_ids[i]), [c for c, flag in zip(names, y[i], strict=True) if flag > 0], float(d))
        for i, d in zip(found[0], distances[0], strict=True)
    ]


def upload_neighbours(
    session: Session, upload: Upload, count: int, timing: Timing
) -> tuple[ServedModel, list[Neighbour]]:
    """The model ``upload`` names and the ``count`` reference records nearest to its one record."""
    served = requested_model(session, upload.model, timing)
    with leased_record(served, upload, THREE_CROP.windowing, timing) as (loaded, recording):
        return served, nearest_references(loaded, recording, count)
