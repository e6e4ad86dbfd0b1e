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

    def split(self, name: Split, test_fold: int | None = None) -> np.ndarray:
        """Record indices of a split. Folds are PTB-XL's ``strat_fold`` where present, else 10 deterministic
        folds grouped by patient (by record when patients are unknown). Default: folds 1-8 train, 9
        validates, 10 tests (the PTB-XL benchmark split). ``test_fold`` k (cross-validation): fold k
        tests, the next fold (k + 1, 10 -> 1) validates, the other eight train."""
        folds = self.folds if self.folds is not None else self._bucket_folds()
        test, val = (10, 9) if test_fold is None else (test_fold, test_fold % 10 + 1)
        if name == "test":
            return np.nonzero(folds == test)[0]
        if name == "val":
            return np.nonzero(folds == val)[0]
        return np.nonzero(~np.isin(folds, [test, val]) & np.isin(folds, range(1, 11)))[0]

    def _bucket_folds(self) -> np.ndarray:
        """Folds 1-10 from a stable hash of the patient (or record) id: buckets 0-9 -> fold 1, ..."""
        groups = (
            self.patient_ids
            if self.patient_ids is not None
            else [self.record_id(i) for i in range(len(self))]
        )
        return np.array([_stable_bucket(str(g)) // 10 + 1 for g in groups])


def _stable_bucket(key: str) -> int:
    import hashlib

    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
