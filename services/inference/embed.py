"""Embeddings from exported ONNX encoders: one cached ONNX Runtime session per model version."""

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.ecg.clinical import FeatureNormaliser, clinical_features
from services.ecg.preprocess import InputSpec, Windowing, preprocess
from services.ecg.recording import Recording
from services.errors import ClientError
from services.export.onnx import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class ServedModel:
    """What serving needs of a model version (detached from the database session)."""

    version_id: int
    name: str
    version: int
    onnx_path: str
    sha256: str
    spec: InputSpec
    embedding_dim: int
    clinical_normaliser: dict | None = None  # hybrid: clinical measurements appended to the embedding


class SessionCache:
    """LRU of ONNX Runtime sessions keyed by model version id (thread-safe)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._sessions: OrderedDict[int, ort.InferenceSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: ServedModel) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(model.version_id)
            if session is not None:
                self._sessions.move_to_end(model.version_id)
                return session
        if not Path(model.onnx_path).is_file():
            raise ClientError(
                f"the ONNX file of {model.name}@{model.version} is missing from the artifact store"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model.onnx_path, options, providers=ort.get_available_providers())
        with self._lock:
            self._sessions[model.version_id] = session
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
        return session

    def __len__(self) -> int:
        return len(self._sessions)


SESSIONS = SessionCache()


def embed_recording(
    model: ServedModel, recording: Recording, windowing: Windowing = "sliding", pad: bool = False
) -> tuple[np.ndarray, int]:
    """(embedding (D,), number of windows averaged) for one recording at its own sampling rate.

    A hybrid model's embedding is the encoder's (mean over the windows) followed by the record's
    normalised clinical measurements and their missing flags, measured at the record's own rate.
    """
    windows = preprocess(recording, model.spec, windowing=windowing, pad=pad)  # (n, C, L)
    session = SESSIONS.get(model)
    out = session.run([OUTPUT_NAME], {INPUT_NAME: windows})[0]  # (n, D)
    vector = out.mean(axis=0)
    if model.clinical_normaliser is not None:
        normaliser = FeatureNormaliser.from_dict(model.clinical_normaliser)
        clinical = normaliser.transform_stacked(clinical_features(recording)[None])[0]  # (2F,)
        vector = np.concatenate([vector, clinical])
    return vector, len(windows)
