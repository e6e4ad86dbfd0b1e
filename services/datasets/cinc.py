"""PhysioNet/CinC Challenge 2020/2021 layout: WFDB records (``.hea`` + MATLAB ``.mat`` signal files) whose
header comments carry the diagnoses as SNOMED CT codes, e.g. ``# Dx: 164889003,59118001``."""

import re
from pathlib import Path

import numpy as np
import pandas as pd

from services.datasets.base import EcgDataset
from services.datasets.wfdb_folder import (
    HeaderInfo,
    file_inside,
    header_summary,
    read_header_info,
    scan_folder,
)
from services.ecg.readers import read_wfdb
from services.ecg.recording import Recording
from services.errors import DatasetError

_DX = re.compile(r"^\s*Dx\s*:\s*(.*)$", re.IGNORECASE)


def dx_codes(comments: tuple[str, ...] | list[str]) -> list[str] | None:
    """The SNOMED codes of the ``Dx:`` comment (comment text without '#'), or None without one."""
    for comment in comments:
        match = _DX.match(comment)
        if match:
            return [code.strip() for code in match.group(1).split(",") if code.strip()]
    return None


class CincDataset(EcgDataset):
    """Every record under the folder (recursive, sorted by relative path) with multi-hot labels.

    With ``mapping_csv`` (relative to the folder; columns ``snomed`` and ``label``) the classes are the
    mapping's labels in order of first appearance, several codes may map to one label, and codes not in
    the map are ignored. Without it every distinct code found is a class (sorted). A record without a
    ``Dx`` comment, or with only unmapped codes, is unlabelled. Other comments (Age, Sex, Rx, ...) are
    not used. ``wfdb`` reads the ``.mat`` signal files through the byte offset in the header
    (``16+24``).
    """

    kind = "cinc"

    def __init__(self, root: Path, mapping_csv: str | None = None):
        self.root = Path(root)
        self.headers, self.names = scan_folder(self.root, "CinC (WFDB)")
        self.infos: list[HeaderInfo] = [read_header_info(h) for h in self.headers]
        self.codes: list[list[str]] = [dx_codes(info.comments) or [] for info in self.infos]
        if mapping_csv is not None:
            mapping = _read_mapping(file_inside(self.root, mapping_csv, "mapping_csv"))
            self.label_names = tuple(dict.fromkeys(mapping.values()))
        else:
            found = {code for codes in self.codes for code in codes}
            mapping = {code: code for code in found}
            self.label_names = tuple(
                sorted(found, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
            )
        position = {name: k for k, name in enumerate(self.label_names)}
        self.labels = np.zeros((len(self.headers), len(self.label_names)), dtype=np.float32)
        for row, codes in enumerate(self.codes):
            for code in codes:
                if code in mapping:
                    self.labels[row, position[mapping[code]]] = 1.0

    def __len__(self) -> int:
        return len(self.headers)

    def record_id(self, index: int) -> str:
        return self.names[index]

    def recording(self, index: int) -> Recording:
        return read_wfdb(self.headers[index])

    def summary(self) -> dict:
        return header_summary(self, self.infos)


def _read_mapping(path: Path) -> dict[str, str]:
    try:
        table = pd.read_csv(path, dtype=str)
    except Exception as exc:
        raise DatasetError(f"mapping_csv '{path.name}' is not a readable CSV file ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("snomed", "label") if c not in table.columns]
    if missing:
        raise DatasetError(
            f"mapping_csv '{path.name}' needs columns 'snomed' (code) and 'label' (class name); "
            f"missing {', '.join(missing)} (found: {', '.join(table.columns)})"
        )
    mapping: dict[str, str] = {}
    for code, label in zip(table["snomed"], table["label"], strict=True):
        if pd.isna(code) or pd.isna(label) or not str(label).strip():
            continue
        code = str(code).strip().removesuffix(".0")
        if code in mapping and mapping[code] != str(label).strip():
            raise DatasetError(
                f"mapping_csv '{path.name}': code {code} maps to both '{mapping[code]}' and '{label}'"
            )
        mapping[code] = str(label).strip()
    if not mapping:
        raise DatasetError(f"mapping_csv '{path.name}' maps no code to a label")
    return mapping
