"""The dataset kinds, their options, and how a stored dataset's kind is recognised."""

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from services.datasets.base import EcgDataset
from services.datasets.cinc import CincDataset, dx_codes
from services.datasets.npz import NpzDataset
from services.datasets.ptbxl import PtbxlDataset
from services.datasets.synthetic import MAX_RECORDS, SyntheticDataset
from services.datasets.wfdb_folder import WfdbFolderDataset, read_header_info
from services.errors import DatasetError

DATASET_KINDS: dict[str, type[EcgDataset]] = {
    "ptbxl": PtbxlDataset,
    "wfdb_folder": WfdbFolderDataset,
    "cinc": CincDataset,
    "npz": NpzDataset,
    "synthetic": SyntheticDataset,
}


@dataclass(frozen=True)
class Option:
    """One option of a kind: its type, what values are allowed (in words and as a check), a default."""

    type: type
    expected: str
    check: Any = None  # callable(value) -> bool
    required: bool = False


OPTIONS: dict[str, dict[str, Option]] = {
    "ptbxl": {"sampling_rate": Option(int, "100 or 500 (Hz)", lambda v: v in (100, 500))},
    "wfdb_folder": {
        "labels_csv": Option(str, "a CSV file path relative to the dataset folder", lambda v: bool(v.strip()))
    },
    "cinc": {
        "mapping_csv": Option(
            str, "a CSV file path relative to the dataset folder", lambda v: bool(v.strip())
        )
    },
    "npz": {},
    "synthetic": {
        "n": Option(
            int, f"an integer from 1 to {MAX_RECORDS}", lambda v: 1 <= v <= MAX_RECORDS, required=True
        ),
        "seed": Option(int, "an integer from 0 to 2**32 - 1", lambda v: 0 <= v < 2**32),
    },
}

# how many headers detection looks at for a CinC 'Dx' comment
_DETECT_HEADERS = 20


def validate_options(kind: str, options: dict | None) -> dict:
    """The options checked against the kind's: unknown names, wrong types or values -> DatasetError."""
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind '{kind}'; expected one of {', '.join(DATASET_KINDS)}")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise DatasetError(f"dataset options must be an object of name: value, got {type(options).__name__}")
    allowed = OPTIONS[kind]
    for name, value in options.items():
        spec = allowed.get(name)
        if spec is None:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise DatasetError(f"unknown option '{name}' for dataset kind '{kind}'; {takes}")
        if isinstance(value, bool) or not isinstance(value, spec.type):
            got = f"{type(value).__name__} {value!r}"
            raise DatasetError(f"option '{name}' of kind '{kind}' must be {spec.expected}, got {got}")
        if spec.check is not None and not spec.check(value):
            raise DatasetError(f"option '{name}' of kind '{kind}' must be {spec.expected}, got {value!r}")
    for name, spec in allowed.items():
        if spec.required and name not in options:
            raise DatasetError(f"dataset kind '{kind}' needs the option '{name}' ({spec.expected})")
    return dict(options)


def open_dataset(kind: str, path: Path | None, options: dict | None = None) -> EcgDataset:
    """Open a dataset of ``kind`` at ``path`` (already resolved inside the data root by the caller; None
    for ``synthetic``, which takes no path) with validated ``options``."""
    options = validate_options(kind, options)
    if kind == "synthetic":
        if path is not None:
            raise DatasetError("the 'synthetic' dataset kind takes no path; give only its options n and seed")
        return SyntheticDataset(**options)
    if path is None:
        raise DatasetError(f"dataset kind '{kind}' needs a path inside the data root")
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path '{path.name}' does not exist")
    if kind != "npz" and not path.is_dir():
        raise DatasetError(f"dataset kind '{kind}' needs a folder, and '{path.name}' is a file")
    return DATASET_KINDS[kind](path, **options)


def detect_dataset_kind(path: Path) -> str:
    """``ptbxl`` (ptbxl_database.csv), ``npz`` (a .npz file, or a folder holding exactly one), ``cinc``
    (WFDB headers with a ``# Dx:`` comment, judged on the first few), ``wfdb_folder`` (any .hea below)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise DatasetError(
            f"'{path.name}' is a file but not a .npz array file; a dataset is a .npz or a folder "
            "(PTB-XL, CinC or any WFDB records)"
        )
    if not path.is_dir():
        raise DatasetError(f"dataset path '{path.name}' does not exist")
    if (path / "ptbxl_database.csv").is_file():
        return "ptbxl"
    if len([p for p in path.glob("*.npz") if p.is_file()]) == 1:
        return "npz"
    headers = list(islice((p for p in path.rglob("*.hea") if p.is_file()), _DETECT_HEADERS))
    if headers:
        for header in headers:
            try:
                if dx_codes(read_header_info(header).comments) is not None:
                    return "cinc"
            except DatasetError:
                continue
        return "wfdb_folder"
    raise DatasetError(
        f"'{path.name}' holds no recognised dataset: expected ptbxl_database.csv (PTB-XL), one .npz file, "
        "or WFDB records (.hea headers, with '# Dx:' comments for CinC)"
    )
