"""A labelled dataset prepared for a downstream job: preprocessed cache, train / val / test records, labels,
and features of cached segments averaged over ST-MEM's 3 test-time crops.

Records are split by ``EcgDataset.split`` (folds 1-8 / 9 / 10, or fold k tests and k + 1 validates for
cross-validation; datasets without folds get 10 by patient). With
``record_limit`` only the dataset's first N records (in its order) are used, then split. Every record is
cut by the cache into 10-s segments; record-level outputs are the mean over a record's segments.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from services.config import get_settings
from services.datasets.base import EcgDataset
from services.datasets.cache import PreprocessedCache, preprocessed
from services.datasets.registry import open_registered
from services.db.models import Dataset as DatasetRow
from services.ecg.clinical import FeatureNormaliser, clinical_features_for
from services.ecg.preprocess import InputSpec, segment_crops
from services.errors import ClientError
from services.jobs.runner import JobReporter
from services.models.triplet import LabelledBatch

SPLITS = ("train", "val", "test")

WindowFn = Callable[[np.ndarray], np.ndarray]  # (B, C, W) standardised windows -> (B, ...) outputs


@dataclass
class LabelledData:
    """``records[split]``: positions in ``cache.record_ids``; ``labels``: (records, K) per cache record."""

    spec: InputSpec
    dataset: EcgDataset
    identity: dict
    name: str
    cache: PreprocessedCache
    class_names: tuple[str, ...]
    labels: np.ndarray  # (R, K) multi-hot per cache record
    source_index: np.ndarray  # (R,) each cache record's index in the dataset
    records: dict[str, np.ndarray]

    def segments(self, split: str) -> np.ndarray:
        """Rows of ``cache.signals`` (segments) of the split's records."""
        return self.cache.segments_of(self.records[split])

    def segment_labels(self, segments: np.ndarray) -> np.ndarray:
        return self.labels[self.cache.record_index[segments]]

    def counts(self) -> dict[str, int]:
        return {split: int(len(self.records[split])) for split in SPLITS}

    def clinical(self, normaliser: dict, reporter: JobReporter) -> dict[str, np.ndarray]:
        """A hybrid model's appended features per split: normalised measurements, then missing flags."""
        features = clinical_features_for(
            self.dataset,
            self.source_index,
            cache_dir=Path(get_settings().artifact_dir) / "cache",
            identity=self.identity,
            on_progress=lambda done, total: reporter.cancellable_phase(
                f"clinical measurements: {done}/{total} records"
            ),
        )
        stacked = FeatureNormaliser.from_dict(normaliser).transform_stacked(features)  # (R, 2F)
        return {split: stacked[self.records[split]] for split in SPLITS}


def open_labelled(
    row: DatasetRow,
    spec: InputSpec,
    record_limit: int | None,
    reporter: JobReporter,
    test_fold: int | None = None,
) -> LabelledData:
    """Open a registered dataset, refuse it without labels or an empty split, build its cache for ``spec``
    (one cache for every split: the records in dataset order). ``test_fold``: see ``EcgDataset.split``."""
    dataset, identity = open_registered(row)
    if dataset.labels is None or not dataset.label_names or not np.asarray(dataset.labels).any():
        raise ClientError(
            f"dataset '{row.name}' has no labels, so it cannot train or evaluate a classifier: use a "
            "labelled dataset (PTB-XL superclasses, a wfdb_folder with labels_csv, an npz with labels)"
        )
    limit = len(dataset) if record_limit is None else min(record_limit, len(dataset))
    wanted = {split: dataset.split(split, test_fold) for split in SPLITS}
    wanted = {split: idx[idx < limit] for split, idx in wanted.items()}
    empty = [split for split, idx in wanted.items() if len(idx) == 0]
    if empty:
        raise ClientError(
            f"dataset '{row.name}' has no {' or '.join(empty)} record among the {limit} used "
            "(raise record_limit, or use a dataset with more records)"
        )
    order = np.sort(np.concatenate([wanted[s] for s in SPLITS]))
    cache = preprocessed(
        dataset,
        identity,
        spec,
        Path(get_settings().artifact_dir) / "cache",
        indices=order,
        on_progress=lambda done, total: reporter.cancellable_phase(f"preprocessing records: {done}/{total}"),
    )
    position = {rid: i for i, rid in enumerate(cache.record_ids.tolist())}
    source = {dataset.record_id(int(i)): int(i) for i in order}
    records = {
        split: np.array(
            [
                position[dataset.record_id(int(i))]
                for i in wanted[split]
                if dataset.record_id(int(i)) in position
            ],
            dtype=np.int64,
        )
        for split in SPLITS
    }
    lost = [split for split in SPLITS if len(records[split]) == 0]
    if lost:
        raise ClientError(f"dataset '{row.name}': no readable record left in split(s) {', '.join(lost)}")
    return LabelledData(
        spec=spec,
        dataset=dataset,
        identity=identity,
        name=row.name,
        cache=cache,
        class_names=tuple(dataset.label_names),
        labels=np.asarray(cache.labels, dtype=np.float32),
        source_index=np.array([source[rid] for rid in cache.record_ids.tolist()], dtype=np.int64),
        records=records,
    )


# --------------------------------------------------------------------------------------------------
# 3-crop features of cached segments


def crops(signals: np.ndarray, row: int, window: int, centre_only: bool = False) -> np.ndarray:
    """The 3 test-time crops of one cached segment (``segment_crops``, as ``/predict`` reads an upload),
    each standardised: (3, C, window) (1 when the window fills the segment); ``centre_only``: the middle one
    alone (1, C, window)."""
    return segment_crops(np.asarray(signals[row], dtype=np.float32), window, centre_only)


def three_crop(
    fn: WindowFn,
    signals: np.ndarray,
    rows: np.ndarray,
    window: int,
    batch: int = 64,
    centre_only: bool = False,
) -> np.ndarray:
    """(len(rows), ...) outputs of ``fn`` averaged over each segment's 3 crops (methods.md 1.4), or of the
    centre crop alone (``centre_only``: a cheaper per-epoch check)."""
    out: list[np.ndarray] = []
    per_batch = max(1, batch // 3)
    for start in range(0, len(rows), per_batch):
        chunk = [crops(signals, int(r), window, centre_only) for r in rows[start : start + per_batch]]
        n = len(chunk[0])
        values = np.asarray(fn(np.concatenate(chunk)))  # (len(chunk) * n, ...)
        out.append(values.reshape(len(chunk), n, *values.shape[1:]).mean(axis=1))
    return np.concatenate(out).astype(np.float32)


def torch_fn(module: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> WindowFn:
    """A PyTorch callable as a ``WindowFn`` (no gradients, fp32, results on the CPU)."""

    @torch.no_grad()
    def run(windows: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(windows).to(device)).float().cpu().numpy()

    return run


def features_of(
    data: LabelledData, fn: WindowFn, window: int, records: np.ndarray, centre_only: bool = False
) -> np.ndarray:
    """(len(records), ...): ``fn`` of each record's segments averaged over 3 crops (or the centre crop),
    then over its segments."""
    segments = data.cache.segments_of(records)  # ascending rows of cache.signals
    values = three_crop(fn, data.cache.signals, segments, window, centre_only=centre_only)  # (S, ...)
    lookup = np.full(len(data.labels), -1)
    lookup[records] = np.arange(len(records))
    owner = lookup[data.cache.record_index[segments]]  # (S,) position in ``records``
    sums = np.zeros((len(records), *values.shape[1:]), dtype=np.float64)
    np.add.at(sums, owner, values)
    counts = np.bincount(owner, minlength=len(records)).reshape(-1, *[1] * (values.ndim - 1))
    return (sums / counts).astype(np.float32)


def record_features(
    data: LabelledData, fn: WindowFn, window: int, splits: tuple[str, ...] = SPLITS
) -> dict[str, np.ndarray]:
    """Per split, (records, ...) = ``features_of`` its records."""
    return {split: features_of(data, fn, window, data.records[split]) for split in splits}


def split_labels(data: LabelledData) -> dict[str, np.ndarray]:
    return {split: data.labels[data.records[split]] for split in SPLITS}


class FeatureRecords(Dataset):
    """Precomputed features (N, D) with labels (N, K); items are ``LabelledBatch`` (features, labels)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> LabelledBatch:
        return LabelledBatch(self.features[i], self.labels[i])
