"""A folder of WFDB records (``.hea`` + signal files, searched recursively) with optional labels from a CSV.

Also the WFDB helpers the other header-based kinds (``ptbxl``, ``cinc``) share: a fast header reader and
the summary builder.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import wfdb
from wfdb.io.header import parse_header_content, rx_record, rx_signal

from services.datasets.base import EcgDataset
from services.ecg.readers import read_wfdb
from services.ecg.recording import Recording
from services.errors import DatasetError

_WFDB_DEFAULT_FS = 250.0  # what the WFDB format assumes when the record line omits the frequency


@dataclass(frozen=True)
class HeaderInfo:
    """What a summary needs from one WFDB header: rate, length, lead names and the comment lines."""

    fs: float
    sig_len: int
    sig_names: tuple[str, ...]
    comments: tuple[str, ...] = field(default=())

    @property
    def duration_s(self) -> float:
        return self.sig_len / self.fs


def read_header_info(header_path: Path) -> HeaderInfo:
    """Read one ``.hea`` without touching the signal files.

    ``wfdb.rdheader`` costs about 2 ms a header (almost all of it pandas look-ups while it types every
    signal-line field), i.e. seconds for a few thousand records. The fields needed here are taken with
    wfdb's own header grammar (``wfdb.io.header``: ``parse_header_content``, ``rx_record``,
    ``rx_signal``) at ~0.05 ms a header; anything unusual (multi-segment records, a line the grammar
    does not match, a signal count that disagrees) falls back to ``wfdb.rdheader`` itself.
    """
    try:
        text = Path(header_path).read_text(encoding="ascii", errors="ignore")
        lines, comment_lines = parse_header_content(text)
        record = rx_record.match(lines[0])
        if record is None or record["n_seg"] or not record["sig_len"]:
            raise ValueError("not a plain single-segment record line")
        n_sig = int(record["n_sig"])
        names = []
        for line in lines[1 : 1 + n_sig]:
            signal = rx_signal.match(line)
            if signal is None:
                raise ValueError("signal line")
            names.append(signal["sig_name"].strip())
        if len(names) != n_sig:
            raise ValueError("fewer signal lines than declared")
        fs = float(record["fs"]) if record["fs"] not in ("", ".") else _WFDB_DEFAULT_FS
        comments = tuple(line.strip(" \t#") for line in comment_lines)
        return HeaderInfo(fs, int(record["sig_len"]), tuple(names), comments)
    except (ValueError, IndexError, OSError):
        pass
    return _rdheader_info(Path(header_path))


def _rdheader_info(header_path: Path) -> HeaderInfo:
    try:
        header = wfdb.rdheader(str(header_path.with_suffix("")))
    except Exception as exc:  # wfdb raises many types for a malformed header
        raise DatasetError(f"{header_path.name}: not a readable WFDB header ({exc})") from exc
    if not header.fs or not header.sig_len:
        raise DatasetError(f"{header_path.name}: the header declares no sampling rate or no samples")
    return HeaderInfo(
        float(header.fs),
        int(header.sig_len),
        tuple(header.sig_name or ()),
        tuple(header.comments or ()),
    )


def find_headers(root: Path) -> list[Path]:
    """Every ``.hea`` under ``root`` (recursive), sorted by path relative to ``root``."""
    root = Path(root)
    headers = [p for p in root.rglob("*.hea") if p.is_file()]
    return sorted(headers, key=lambda p: p.relative_to(root).as_posix())


def record_name(root: Path, header: Path) -> str:
    """The record's path relative to ``root`` without ``.hea``, with '/' separators."""
    return header.relative_to(root).with_suffix("").as_posix()


def file_inside(root: Path, relative: str, option: str) -> Path:
    """``relative`` (an option's value) as an existing file inside the dataset folder ``root``."""
    if not isinstance(relative, str) or not relative.strip():
        raise DatasetError(f"option '{option}' must be a file path relative to the dataset folder")
    base = Path(root).resolve()
    if Path(relative).is_absolute():
        raise DatasetError(f"option '{option}' ('{relative}') must be relative to the dataset folder")
    resolved = (base / relative).resolve()
    if base not in resolved.parents:
        raise DatasetError(f"option '{option}' ('{relative}') points outside the dataset folder")
    if not resolved.is_file():
        raise DatasetError(f"option '{option}': file '{relative}' not found in the dataset folder")
    return resolved


def fs_key(fs: float) -> str:
    """A sampling rate as a JSON object key: '500', '257.5'."""
    return f"{float(fs):g}"


def build_summary(
    n_records: int,
    rates: Iterable[float],
    lead_sets: Iterable[Sequence[str]],
    durations: Iterable[float],
    labels: np.ndarray | None,
    label_names: Sequence[str],
    folds: np.ndarray | None,
) -> dict:
    """The ``EcgDataset.summary`` dict. Keys of ``sampling_rates`` and ``folds`` are strings (as JSON
    keys are anyway); ``leads`` lists the lead names in order of first appearance."""
    leads: dict[str, None] = {}
    for names in lead_sets:
        leads.update(dict.fromkeys(names))
    durations = list(durations)
    rate_counts = Counter(fs_key(fs) for fs in rates)
    if labels is None or not len(label_names):
        label_counts: dict[str, int] = {}
        unlabelled = n_records
    else:
        label_counts = {
            name: int(count) for name, count in zip(label_names, labels.sum(axis=0).tolist(), strict=True)
        }
        unlabelled = int((labels.sum(axis=1) == 0).sum())
    fold_counts = (
        {} if folds is None else {str(k): int(v) for k, v in sorted(Counter(folds.tolist()).items())}
    )
    return {
        "records": int(n_records),
        "sampling_rates": dict(sorted(rate_counts.items(), key=lambda kv: float(kv[0]))),
        "leads": list(leads),
        "duration_s": {"min": float(min(durations)), "max": float(max(durations))}
        if durations
        else {"min": 0.0, "max": 0.0},
        "label_counts": label_counts,
        "unlabelled": unlabelled,
        "folds": fold_counts,
    }


def header_summary(dataset: EcgDataset, infos: Sequence[HeaderInfo]) -> dict:
    return build_summary(
        len(dataset),
        (i.fs for i in infos),
        (i.sig_names for i in infos),
        (i.duration_s for i in infos),
        dataset.labels,
        dataset.label_names,
        dataset.folds,
    )


def scan_folder(root: Path, what: str) -> tuple[list[Path], list[str]]:
    """The WFDB headers under ``root`` (recursive, sorted) and their record names; an error if none."""
    if not root.is_dir():
        raise DatasetError(f"'{root.name}' is not a folder of {what} records")
    headers = find_headers(root)
    if not headers:
        raise DatasetError(f"'{root.name}': no WFDB header (.hea) found in the folder")
    return headers, [record_name(root, h) for h in headers]


class WfdbFolderDataset(EcgDataset):
    """Every WFDB record under a folder (recursive, sorted by relative path), optionally labelled.

    ``labels_csv`` (relative to the folder) has a column ``record`` (the record's relative path without
    extension, e.g. ``sub/rec01``, or its bare name ``rec01`` where that is unique in the folder) and
    either a column ``label`` (one label, or several separated by ';'; other columns are ignored) or one
    0/1 column per class. Records missing from the CSV (or with no label) count as unlabelled; CSV rows
    naming no record of the folder are ignored, but a CSV that matches no record at all is an error.
    """

    kind = "wfdb_folder"

    def __init__(self, root: Path, labels_csv: str | None = None):
        self.root = Path(root)
        self.headers, self.names = scan_folder(self.root, "WFDB")
        self._infos: list[HeaderInfo] | None = None
        if labels_csv is not None:
            csv_path = file_inside(self.root, labels_csv, "labels_csv")
            self.label_names, self.labels = _labels_from_csv(csv_path, self.names)

    def __len__(self) -> int:
        return len(self.headers)

    def record_id(self, index: int) -> str:
        return self.names[index]

    def recording(self, index: int) -> Recording:
        return read_wfdb(self.headers[index])

    def header_infos(self) -> list[HeaderInfo]:
        if self._infos is None:
            self._infos = [read_header_info(h) for h in self.headers]
        return self._infos

    def summary(self) -> dict:
        return header_summary(self, self.header_infos())


def _labels_from_csv(csv_path: Path, names: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    try:
        table = pd.read_csv(csv_path, dtype={"record": str})
    except Exception as exc:
        raise DatasetError(f"labels_csv '{csv_path.name}' is not a readable CSV file ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    if "record" not in table.columns:
        raise DatasetError(
            f"labels_csv '{csv_path.name}' needs a column 'record' (found: {', '.join(table.columns)})"
        )
    rows = _match_records(table["record"], names, csv_path.name)
    if "label" in table.columns:
        per_row = [
            [part.strip() for part in str(cell).split(";") if part.strip()] if pd.notna(cell) else []
            for cell in table["label"]
        ]
        label_names = tuple(sorted({label for labels in per_row for label in labels}))
        hot = np.zeros((len(table), len(label_names)), dtype=np.float32)
        position = {name: k for k, name in enumerate(label_names)}
        for r, labels in enumerate(per_row):
            for label in labels:
                hot[r, position[label]] = 1.0
    else:
        classes = [c for c in table.columns if c != "record"]
        if not classes:
            raise DatasetError(
                f"labels_csv '{csv_path.name}' needs a column 'label' or one 0/1 column per class "
                "besides 'record'"
            )
        label_names = tuple(classes)
        hot = np.zeros((len(table), len(classes)), dtype=np.float32)
        for k, column in enumerate(classes):
            values = pd.to_numeric(table[column], errors="coerce")
            bad = ~(values.isin([0, 1]) | table[column].isna())
            if bad.any():
                example = table[column][bad].iloc[0]
                raise DatasetError(
                    f"labels_csv '{csv_path.name}': class column '{column}' must hold 0 or 1, "
                    f"found '{example}' (a single label column must be named 'label')"
                )
            hot[:, k] = values.fillna(0).to_numpy(dtype=np.float32)
    labels = np.zeros((len(names), len(label_names)), dtype=np.float32)
    for r, index in enumerate(rows):
        if index is not None:
            labels[index] = np.maximum(labels[index], hot[r])
    return label_names, labels


def _match_records(column: pd.Series, names: list[str], csv_name: str) -> list[int | None]:
    """For each CSV row the index of its record (by relative path, else by unique bare name) or None."""
    by_path = {name: i for i, name in enumerate(names)}
    stems = Counter(name.rsplit("/", 1)[-1] for name in names)
    by_stem = {
        name.rsplit("/", 1)[-1]: i for i, name in enumerate(names) if stems[name.rsplit("/", 1)[-1]] == 1
    }
    rows: list[int | None] = []
    for cell in column:
        key = str(cell).strip().removesuffix(".hea").strip("/") if pd.notna(cell) else ""
        index = by_path.get(key)
        if index is None and "/" not in key:
            if stems.get(key, 0) > 1:
                raise DatasetError(
                    f"labels_csv '{csv_name}': record '{key}' is ambiguous ({stems[key]} records of that "
                    "name in sub-folders); give its relative path"
                )
            index = by_stem.get(key)
        rows.append(index)
    if not any(index is not None for index in rows):
        raise DatasetError(
            f"labels_csv '{csv_name}': no value of column 'record' names a record of the folder "
            f"(e.g. '{names[0]}')"
        )
    return rows
