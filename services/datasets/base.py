"""What every dataset kind offers: records as ``Recording``s, optional multi-hot labels, folds, a summary."""

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np

from services.ecg.recording import Recording

Split = Literal["train", "val", "test"]


class EcgDataset(ABC):
    """A collection of ECG records. Subclasses set the attributes in ``__init__``.

    - ``label_names``: class names of the multi-hot ``labels`` ((N, K) float32), () when unlabelled
    - ``folds``: (N,) int fold numbers (PTB-XL ``strat_fold``) or None
    - ``patient_ids``: (N,) patient of each record, or None
    """

    kind: ClassVar[str]
    label_names: tuple[str, ...] = ()
    labels: np.ndarray | None = None
    folds: np.ndarray | None = None
    patient_ids: np.ndarray | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def record_id(self, index: int) -> str: ...

    @abstractmethod
    def recording(self, index: int) -> Recording:
        """The record's signal (mV where the source says so), rate and lead names as stored."""

    @abstractmethod
    def summary(self) -> dict:
        """JSON-able overview without loading every signal: ``records``, ``sampling_rates`` ({fs: count}),
        ``leads`` (names found), ``duration_s`` ({min, max}), ``label_counts`` ({name: count}, {} when
        unlabelled), ``unlabelled`` (records without any label), ``folds`` ({fold: count}, {} when none)."""

    def split(self, name: Split) -> np.ndarray:
        """Record indices of a split: PTB-XL folds 1-8 / 9 / 10 where folds exist, else a deterministic
        80/10/10 split grouped by patient (by record when patients are unknown)."""
        if self.folds is not None:
            wanted = {"train": range(1, 9), "val": (9,), "test": (10,)}[name]
            return np.nonzero(np.isin(self.folds, list(wanted)))[0]
        groups = (
            self.patient_ids
            if self.patient_ids is not None
            else [self.record_id(i) for i in range(len(self))]
        )
        buckets = np.array([_stable_bucket(str(g)) for g in groups])  # 0..99
        low, high = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}[name]
        return np.nonzero((buckets >= low) & (buckets < high))[0]


def _stable_bucket(key: str) -> int:
    import hashlib

    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
