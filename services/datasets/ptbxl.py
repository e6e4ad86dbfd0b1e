"""PTB-XL in its PhysioNet layout: ``ptbxl_database.csv``, ``scp_statements.csv``, ``records{100,500}/``."""

import ast
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from services.datasets.base import EcgDataset
from services.datasets.wfdb_folder import HeaderInfo, header_summary, read_header_info
from services.ecg.readers import read_wfdb
from services.ecg.recording import Recording
from services.errors import DatasetError

SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
BENCHMARK_SPLIT: dict[str, tuple[int, ...]] = {"train": tuple(range(1, 9)), "val": (9,), "test": (10,)}


class PtbxlDataset(EcgDataset):
    """The records of a PTB-XL folder whose signal files are present, with labels and folds.

    ``labels``: multi-hot diagnostic superclasses (``SUPERCLASSES`` order) from ``scp_codes`` through
    ``scp_statements.csv`` (``diagnostic == 1``, likelihood ignored); ``folds``: ``strat_fold``;
    ``patient_ids``: ``patient_id``; ``table``: the rows of ``ptbxl_database.csv`` kept, indexed by
    ``ecg_id``.
    """

    kind = "ptbxl"
    label_names = SUPERCLASSES

    def __init__(self, root: Path, sampling_rate: int = 500):
        self.root = Path(root)
        database = self.root / "ptbxl_database.csv"
        if not database.is_file():
            raise DatasetError(f"{self.root.name}: no ptbxl_database.csv, so not a PTB-XL folder")
        if sampling_rate not in (100, 500):
            raise DatasetError(f"option 'sampling_rate': PTB-XL comes at 100 or 500 Hz, not {sampling_rate}")
        self.sampling_rate = sampling_rate
        column = "filename_hr" if sampling_rate == 500 else "filename_lr"
        table = pd.read_csv(database, index_col="ecg_id")
        present = table[column].map(lambda rel: (self.root / f"{rel}.hea").is_file())
        self.table = table[present].copy()
        if self.table.empty:
            raise DatasetError(
                f"{self.root.name}: ptbxl_database.csv lists no record whose files are present "
                f"at {sampling_rate} Hz"
            )
        self.table["scp_codes"] = self.table["scp_codes"].map(ast.literal_eval)
        self.file_column = column
        self.labels = self._superclass_labels()
        self.folds = self.table["strat_fold"].to_numpy(dtype=np.int64)
        patients = self.table["patient_id"].to_numpy()
        self.patient_ids = patients.astype(np.int64) if not pd.isna(patients).any() else patients
        self._infos: list[HeaderInfo] | None = None

    def _superclass_labels(self) -> np.ndarray:
        """Multi-hot (records, 5) in SUPERCLASSES order, from diagnostic SCP codes (likelihood ignored)."""
        statements_path = self.root / "scp_statements.csv"
        if not statements_path.is_file():
            return np.zeros((len(self.table), len(SUPERCLASSES)), dtype=np.float32)
        statements = pd.read_csv(statements_path, index_col=0)
        diagnostic = statements[statements["diagnostic"] == 1]["diagnostic_class"].to_dict()
        labels = np.zeros((len(self.table), len(SUPERCLASSES)), dtype=np.float32)
        for row, codes in enumerate(self.table["scp_codes"]):
            for code in codes:
                cls = diagnostic.get(code)
                if cls in SUPERCLASSES:
                    labels[row, SUPERCLASSES.index(cls)] = 1.0
        return labels

    def __len__(self) -> int:
        return len(self.table)

    def record_id(self, index: int) -> str:
        return str(self.table.index[index])

    def header_path(self, index: int) -> Path:
        return self.root / f"{self.table[self.file_column].iloc[index]}.hea"

    def indices(self, folds: tuple[int, ...] | None) -> np.ndarray:
        if folds is None:
            return np.arange(len(self))
        return np.nonzero(np.isin(self.folds, folds))[0]

    def recording(self, index: int) -> Recording:
        return read_wfdb(self.header_path(index))

    def recordings(self, indices: np.ndarray) -> Iterator[Recording]:
        for i in indices:
            yield self.recording(int(i))

    def summary(self) -> dict:
        if self._infos is None:
            self._infos = [read_header_info(self.header_path(i)) for i in range(len(self))]
        return header_summary(self, self._infos)
