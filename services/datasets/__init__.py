"""Datasets for pretraining and evaluation, resolved inside the data root."""

from pathlib import Path

from services.errors import DatasetError


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
