"""Datasets for pretraining and evaluation, resolved inside the data root."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.datasets.ptbxl import PtbxlDataset
from services.ecg.leads import STANDARD_LEADS
from services.ecg.preprocess import InputSpec, prepare_signal
from services.ecg.recording import Recording
from services.errors import DatasetError, EcgInputError

ProgressFn = Callable[[int, int], None]


def resolve_data_path(data_root: Path, path: str) -> Path:
    """``path`` (relative to the data root, or absolute inside it) as an existing path inside the root."""
    root = Path(data_root).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise DatasetError(f"dataset path '{path}' is outside the data root; give a path inside it")
    if not resolved.exists():
        raise DatasetError(f"dataset path '{path}' does not exist under the data root")
    return resolved


def detect_kind(path: Path) -> str:
    """``ptbxl`` for a folder with ptbxl_database.csv, ``npz`` for a .npz file (or a folder holding one)."""
    if path.is_dir() and (path / "ptbxl_database.csv").is_file():
        return "ptbxl"
    if path.is_file() and path.suffix == ".npz" or path.is_dir() and len(list(path.glob("*.npz"))) == 1:
        return "npz"
    raise DatasetError(
        f"'{path.name}' is neither a PTB-XL folder (with ptbxl_database.csv) nor a .npz array file"
    )


@dataclass
class SignalSet:
    """Prepared (filtered, resampled) signals (N, leads, T) ready to be windowed and standardised."""

    signals: np.ndarray
    kind: str
    record_ids: list[str]
    skipped: list[str]


def load_signals(
    path: Path,
    spec: InputSpec,
    limit: int | None = None,
    folds: tuple[int, ...] | None = None,
    on_progress: ProgressFn | None = None,
) -> SignalSet:
    """Read and prepare every record of a dataset with the one preprocessing function."""
    kind = detect_kind(path)
    if kind == "ptbxl":
        dataset = PtbxlDataset(path)
        indices = dataset.indices(folds)[:limit]
        recordings = ((str(dataset.table.index[i]), lambda i=i: dataset.recording(int(i))) for i in indices)
        total = len(indices)
    else:
        file = path if path.is_file() else next(path.glob("*.npz"))
        arrays = np.load(file)
        if "signals" not in arrays.files:
            raise DatasetError(f"{file.name}: expected an array named 'signals' (records, leads, samples)")
        signals = arrays["signals"][:limit]
        ids = arrays["ecg_id"][:limit] if "ecg_id" in arrays.files else np.arange(len(signals))
        fs = float(arrays["fs"]) if "fs" in arrays.files else 250.0
        if signals.ndim != 3 or signals.shape[1] != len(STANDARD_LEADS):
            raise DatasetError(f"{file.name}: 'signals' must be (records, 12, samples), got {signals.shape}")
        recordings = (
            (
                str(rid),
                lambda s=s, rid=rid: Recording(s.astype(np.float32), fs, list(STANDARD_LEADS), str(rid)),
            )
            for rid, s in zip(ids, signals, strict=True)
        )
        total = len(signals)
    prepared, record_ids, skipped = [], [], []
    for n, (record_id, read) in enumerate(recordings, start=1):
        try:
            x = prepare_signal(read(), spec)
        except EcgInputError as exc:
            skipped.append(f"{record_id}: {exc}")
            continue
        if x.shape[1] < spec.samples:
            skipped.append(f"{record_id}: shorter than {spec.samples} samples")
            continue
        prepared.append(x)
        record_ids.append(record_id)
        if on_progress and (n % 50 == 0 or n == total):
            on_progress(n, total)
    if not prepared:
        raise DatasetError(f"'{path.name}': no usable record ({len(skipped)} skipped)")
    length = min(x.shape[1] for x in prepared)
    return SignalSet(np.stack([x[:, :length] for x in prepared]), kind, record_ids, skipped)
