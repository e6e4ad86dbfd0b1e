"""The preprocessed cache: a dataset converted once per preprocessing spec, read memory-mapped by training.

Layout of ``<artifact_dir>/cache/<key>/`` (key = hash of the dataset identity and the spec):
    signals.f32   raw float32 (segments, leads, segment_samples), C order, read with np.memmap
    index.npz     record_index (segments,), record_ids (records,), labels (records, K), folds (records,)
    meta.json     spec, dataset identity, shapes, label names, skipped records, build time

Each record is prepared with ``services.ecg.preprocess.prepare_signal`` (the one preprocessing path)
and cut into non-overlapping segments of ``segment_s`` seconds (ST-MEM's 10-s segments; shorter
records are skipped and listed). A cache is built in a temporary folder and renamed into place, so a
reader never sees a half-written one and two builders of the same key do not collide.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.datasets.base import EcgDataset
from services.ecg.preprocess import SEGMENT_S, InputSpec, prepare_signal, split_segments
from services.errors import DatasetError, EcgInputError

CACHE_FORMAT = 1  # bump when the layout or the preprocessing changes meaning

ProgressFn = Callable[[int, int], None]


@dataclass
class PreprocessedCache:
    """An opened cache: ``signals`` is a read-only memmap (segments, leads, segment_samples)."""

    path: Path
    signals: np.ndarray
    record_index: np.ndarray
    record_ids: np.ndarray
    labels: np.ndarray | None
    folds: np.ndarray | None
    meta: dict

    def segments_of(self, records: np.ndarray) -> np.ndarray:
        """Segment indices belonging to the given record indices."""
        return np.nonzero(np.isin(self.record_index, records))[0]


def cache_key(identity: dict, spec: InputSpec, segment_s: float) -> str:
    payload = json.dumps(
        {"format": CACHE_FORMAT, "dataset": identity, "spec": spec.to_dict(), "segment_s": segment_s},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def open_cache(directory: Path) -> PreprocessedCache:
    meta = json.loads((directory / "meta.json").read_text())
    shape = tuple(meta["shape"])
    signals = np.memmap(directory / "signals.f32", dtype=np.float32, mode="r", shape=shape)
    index = np.load(directory / "index.npz")
    return PreprocessedCache(
        path=directory,
        signals=signals,
        record_index=index["record_index"],
        record_ids=index["record_ids"],
        labels=index["labels"] if "labels" in index.files else None,
        folds=index["folds"] if "folds" in index.files else None,
        meta=meta,
    )


def preprocessed(
    dataset: EcgDataset,
    identity: dict,
    spec: InputSpec,
    cache_root: Path,
    segment_s: float = SEGMENT_S,
    indices: np.ndarray | None = None,
    on_progress: ProgressFn | None = None,
) -> PreprocessedCache:
    """The cache of ``dataset`` (or of its records ``indices``) under ``spec``, built now if missing.

    ``identity`` names the dataset's content (kind, resolved path, options, file mtime) so that a
    changed dataset gets a new cache.
    """
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        identity = {**identity, "indices_sha": hashlib.sha256(indices.tobytes()).hexdigest()[:16]}
    directory = Path(cache_root) / cache_key(identity, spec, segment_s)
    if (directory / "meta.json").is_file():
        return open_cache(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _build(dataset, identity, spec, segment_s, indices, building, on_progress)
        try:
            os.rename(building, directory)
        except OSError:  # another builder finished first: use theirs
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return open_cache(directory)


def _build(
    dataset: EcgDataset,
    identity: dict,
    spec: InputSpec,
    segment_s: float,
    indices: np.ndarray | None,
    directory: Path,
    on_progress: ProgressFn | None,
) -> None:
    started = time.perf_counter()
    segment = int(round(segment_s * spec.fs))
    if segment < spec.samples:
        raise DatasetError(
            f"segments of {segment_s} s are shorter than the model window ({spec.samples} samples)"
        )
    order = np.arange(len(dataset)) if indices is None else indices
    total = len(order)
    record_index, kept_records, skipped = [], [], []
    n_segments = 0
    with open(directory / "signals.f32", "wb") as out:
        for done, i in enumerate(order.tolist(), start=1):
            try:
                x = prepare_signal(dataset.recording(i), spec)  # (leads, T) float32 at spec.fs
            except EcgInputError as exc:
                skipped.append(f"{dataset.record_id(i)}: {exc}")
                continue
            segments = split_segments(x, segment)  # (count, leads, segment), as /predict cuts an upload
            count = len(segments)
            if count == 0:
                skipped.append(
                    f"{dataset.record_id(i)}: {x.shape[1] / spec.fs:.1f} s is shorter than {segment_s} s"
                )
                continue
            out.write(segments.astype(np.float32, copy=False).tobytes())
            record_index.extend([len(kept_records)] * count)
            kept_records.append(i)
            n_segments += count
            if on_progress is not None and (done % 25 == 0 or done == total):
                on_progress(done, total)
    if n_segments == 0:
        raise DatasetError(f"no usable record in the dataset ({len(skipped)} skipped; first: {skipped[:1]})")
    kept = np.array(kept_records)
    arrays = {
        "record_index": np.array(record_index, dtype=np.int64),
        "record_ids": np.array([dataset.record_id(int(i)) for i in kept]),
        "source_index": kept,
    }
    if dataset.labels is not None:
        arrays["labels"] = np.asarray(dataset.labels, dtype=np.float32)[kept]
    if dataset.folds is not None:
        arrays["folds"] = np.asarray(dataset.folds)[kept]
    np.savez(directory / "index.npz", **arrays)
    meta = {
        "format": CACHE_FORMAT,
        "dataset": identity,
        "spec": spec.to_dict(),
        "segment_s": segment_s,
        "shape": [n_segments, len(spec.leads), segment],
        "records": len(kept),
        "label_names": list(dataset.label_names),
        "skipped": skipped,
        "build_s": round(time.perf_counter() - started, 3),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
