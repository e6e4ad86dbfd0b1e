"""Datasets for pretraining and evaluation, resolved inside the data root."""

import unicodedata
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from services.errors import DatasetError


def path_text_problem(path: str) -> str | None:
    """Why the text ``path`` cannot name a file under the data root (empty, or holding a control character
    such as NUL, which the operating system refuses), or None. One check for every path field."""
    if not path.strip():
        return "is empty: expected a path under the data root (e.g. 'ptbxl-500')"
    for position, char in enumerate(path):
        if unicodedata.category(char) == "Cc":  # C0 (NUL, newline, ...), DEL and C1
            return (
                f"contains the control character U+{ord(char):04X} at position {position}: expected a path "
                "under the data root, without control characters"
            )
    return None


def _path_text(path: str) -> str:
    problem = path_text_problem(path)
    if problem is not None:
        raise ValueError(f"the path {problem}")
    return path


# a request field naming a file or folder under the data root: refused at the schema (422) when empty or
# holding a control character
DataPath = Annotated[str, AfterValidator(_path_text)]


def resolve_data_path(data_root: Path, path: str) -> Path:
    """``path`` (relative to the data root, or absolute inside it) as an existing path inside the root."""
    problem = path_text_problem(path)
    if problem is not None:
        raise DatasetError(f"dataset path {path!r} {problem}")
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


def relative_to_root(data_root: Path, path: str | Path | None) -> str | None:
    """A stored (absolute) path as the API shows it: relative to the data root ('.' for the root itself);
    a path outside the root (the root was moved) as its last component only."""
    if path is None:
        return None
    root, absolute = Path(data_root).resolve(), Path(path)
    if absolute == root or root in absolute.parents:
        return absolute.relative_to(root).as_posix()
    return absolute.name
