"""Embedding export jobs (``POST /jobs/embed``): every record of a registered dataset embedded with a version.

Each record is embedded exactly as ``POST /embed`` embeds an upload of it: read in mV, checked
(``model_recording``), cut into the model's windows by the one preprocessing function, run through the
version's ONNX session (micro-batched) and averaged (``services.inference.embed.embed_recordings``), so a row
of the export equals what ``/embed`` answers for that record with the same ``precision`` and ``windowing``.
The job's artifacts (``GET /jobs/{id}/artifacts/{name}``):

- ``embeddings.npy``: float32 (records embedded, dimension), in the order of ``records.json``;
- ``records.json``: the model version, dataset, label names and, per row, the record id, fold and labels
  (where the dataset has labels), and the records that could not be embedded with the reason;
- ``embeddings.parquet``: the same table (id, fold, labels, embedding) where pyarrow is installed.
"""

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.errors import ClientError
from services.jobs.params import EmbedDatasetParams

if TYPE_CHECKING:
    from services.datasets.base import EcgDataset
    from services.jobs.runner import JobReporter

CHUNK = 32  # records read and submitted together (they share batched session runs)
FILES = ("embeddings.npy", "records.json", "embeddings.parquet")


def selected_records(dataset: "EcgDataset", params: EmbedDatasetParams) -> np.ndarray:
    """Indices of the records to embed: the folds asked (all without), then the first ``record_limit``."""
    indices = np.arange(len(dataset))
    if params.folds is not None:
        if dataset.folds is None:
            raise ClientError("'folds' was given but the dataset has no folds")
        indices = indices[np.isin(dataset.folds, params.folds)]
    return indices[: params.record_limit]


def run_embed_dataset_job(job_id: uuid.UUID, worker: str) -> str:
    """Run one embedding export job to its end and record the outcome (``services.jobs.runner.run_job``)."""
    from services.jobs.runner import run_job

    return run_job(
        job_id,
        worker,
        lambda raw, reporter: embed_dataset(job_id, EmbedDatasetParams.model_validate(raw), reporter),
    )


def embed_dataset(job_id: uuid.UUID, params: EmbedDatasetParams, reporter: "JobReporter") -> dict:
    from services.datasets.registry import dataset_for_job, open_registered
    from services.db.models import Job
    from services.db.session import session_scope
    from services.ecg.preprocess import Reading
    from services.inference.embed import SESSIONS, Embedded, ServedModel, embed_recordings
    from services.jobs.store import artifacts_dir
    from services.registry import resolve_model_version

    reporter.phase("opening the model version and the dataset")
    with session_scope() as s:
        job = s.get(Job, job_id)
        served = ServedModel.from_version(resolve_model_version(s, params.model))
        row = job.dataset if job.dataset is not None else dataset_for_job(s, params.dataset)
        name = row.name
        dataset, _ = open_registered(row)
    indices = selected_records(dataset, params)
    if not len(indices):
        raise ClientError(f"dataset '{name}' has no record in the selection (folds {params.folds})")
    total, started = len(indices), time.monotonic()
    vectors: list[np.ndarray] = []
    rows: list[dict] = []
    skipped: list[dict] = []
    reporter.update(step=0, total_steps=total)
    reporter.phase(f"embedding {total} records of {name} with {served.ref}")
    # uncached: a worker must not keep the session (GPU memory) after the job; one the API holds is reused
    with SESSIONS.lease(served, params.precision, strict=params.precision != "auto", cache=False) as loaded:
        for start in range(0, total, CHUNK):
            chunk = [int(i) for i in indices[start : start + CHUNK]]
            recordings = []
            for i in chunk:
                try:
                    recordings.append(dataset.recording(i))
                except ClientError as exc:  # an unreadable record is skipped, with its reason
                    recordings.append(exc)
                except Exception as exc:  # a damaged file: skipped too (the export is of what can be read)
                    recordings.append(ClientError(f"could not be read ({type(exc).__name__}: {exc})"))
            results = embed_recordings(
                loaded, recordings, Reading(params.windowing, params.pad, params.interpolate_nan)
            )
            for i, result in zip(chunk, results, strict=True):
                if isinstance(result, Embedded):
                    rows.append(_record_row(dataset, i, len(vectors), result.windows))
                    vectors.append(result.vector.astype(np.float32))
                else:
                    skipped.append({"id": dataset.record_id(i), "error": str(result)})
            done = min(start + CHUNK, total)
            elapsed = time.monotonic() - started
            reporter.update(
                step=done,
                total_steps=total,
                samples_per_s=done / elapsed,
                eta_s=elapsed / done * (total - done),
            )
            reporter.check_cancel(f"after {done} of {total} records")
        variant, provider = loaded.variant, loaded.provider
    if not vectors:
        reasons = "; ".join(f"{s['id']}: {s['error']}" for s in skipped[:5])
        raise ClientError(f"no record of dataset '{name}' could be embedded ({reasons})")

    reporter.phase("writing the embeddings")
    folder = artifacts_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    embeddings = np.stack(vectors)
    np.save(folder / "embeddings.npy", embeddings)
    labelled = bool(dataset.label_names) and dataset.labels is not None
    document = {
        "model_version": served.ref,
        "dataset": name,
        "variant": variant,
        "provider": provider,
        "windowing": params.windowing,
        "embedding_dim": int(embeddings.shape[1]),
        "label_names": list(dataset.label_names) if labelled else None,
        "records": rows,
        "skipped": skipped,
    }
    (folder / "records.json").write_text(json.dumps(document, indent=1) + "\n")
    files = ["embeddings.npy", "records.json"]
    if _write_parquet(folder / "embeddings.parquet", rows, embeddings):
        files.append("embeddings.parquet")
    return {
        "model_version": served.ref,
        "dataset": name,
        "records": len(rows),
        "skipped": len(skipped),
        "embedding_dim": int(embeddings.shape[1]),
        "variant": variant,
        "provider": provider,
        "artifacts": files,
    }


def _record_row(dataset: "EcgDataset", index: int, row: int, windows: int) -> dict:
    """One record of ``records.json``: its row of ``embeddings.npy``, id, fold, windows and labels (names;
    None when the dataset is unlabelled)."""
    labels = None
    if dataset.label_names and dataset.labels is not None:
        labels = [n for n, on in zip(dataset.label_names, dataset.labels[index], strict=True) if on > 0.5]
    fold = int(dataset.folds[index]) if dataset.folds is not None else None
    return {"row": row, "id": dataset.record_id(index), "fold": fold, "windows": windows, "labels": labels}


def _write_parquet(path: Path, rows: list[dict], embeddings: np.ndarray) -> bool:
    """The export as one Parquet table; False (nothing written) where pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        return False
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "fold": [r["fold"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1), type=pa.float32()), embeddings.shape[1]
            ),
        }
    )
    pq.write_table(table, path)
    return True
