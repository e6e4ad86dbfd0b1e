"""Files the CLI writes: embeddings (.npy + ids, Parquet, CSV) and predictions (CSV, JSON)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ecgssl_client.client import EmbedResult

OUTPUT_SUFFIXES = (".npy", ".parquet", ".csv")


def ids_path(npy: Path) -> Path:
    """Where the ids of ``FILE.npy`` go: ``FILE.ids.json``."""
    return npy.with_suffix(".ids.json")


def embeddings_frame(result: EmbedResult) -> pd.DataFrame:
    """One row per record: ``id``, then ``e0`` ... ``e{d-1}``."""
    columns = [f"e{i}" for i in range(result.embeddings.shape[1])]
    frame = pd.DataFrame(result.embeddings, columns=columns)
    frame.insert(0, "id", result.ids)
    return frame


def write_embeddings(path: Path, result: EmbedResult) -> list[Path]:
    """Write ``result`` to ``path`` by its suffix; the files written. ``.npy``: the (records, dimension)
    float32 matrix, and beside it ``.ids.json`` {model, dimension, ids (row order), failed}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, result.embeddings)
        meta = {
            "model": result.model,
            "dimension": int(result.embeddings.shape[1]),
            "ids": result.ids,
            "failed": [{"id": f.id, "status_code": f.status_code, "error": f.error} for f in result.failures],
        }
        ids_path(path).write_text(json.dumps(meta, indent=1) + "\n")
        return [path, ids_path(path)]
    frame = embeddings_frame(result)
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False, float_format="%.7g")
    else:
        raise ValueError(f"{path}: expected one of {', '.join(OUTPUT_SUFFIXES)}")
    return [path]


def write_predictions(path: Path, predictions: list[dict]) -> None:
    """``.json``: the API's answers (with ``id``); ``.csv``: id, model, labels (';'-joined), one
    probability column per class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(predictions, indent=1) + "\n")
        return
    rows = [
        {"id": p["id"], "model": f"{p['model']}@{p['version']}", "labels": ";".join(p["labels"])}
        | p["probabilities"]
        for p in predictions
    ]
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.6g")
