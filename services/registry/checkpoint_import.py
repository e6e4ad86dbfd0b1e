"""Import a published encoder checkpoint: load it strictly, then publish it as a trained encoder is
(``services.registry.publish``: export to ONNX, parity, variants, register).

The checkpoint is a file under the data root (like every dataset path). The ONNX file goes to
``<artifact_dir>/imports/<uuid>/encoder.onnx``.

Parity (PyTorch vs ONNX Runtime) is measured on real ECGs when the data root holds PTB-XL records (any
folder in PhysioNet's layout, ``<folder>/records500/<block>/<id>_hr.hea``, e.g. ``ptbxl-500``; the 100 Hz
``records100`` files when there are no 500 Hz ones): the first ``PARITY_RECORDS`` readable ones, through
the serving preprocessing, one centre window each. Records are only taken where they resolve inside the
data root, as for any other path. Without such records, the windows of a generated deterministic signal
are used, and the stored metrics say so (``parity_source``).
"""

import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.config import get_settings
from services.datasets import resolve_data_path
from services.db.models import Model, ModelVersion
from services.ecg.preprocess import InputSpec, standardise
from services.errors import ClientError, ConflictError, DatasetError
from services.export.contract import sha256_file
from services.export.variants import check_windows
from services.models.checkpoints import FORMATS, load_encoder
from services.registry import register_model_version
from services.registry.publish import publish

log = logging.getLogger(__name__)

PARITY_RECORDS = 4  # one centre window each; a ViT-B forward of 4 windows takes ~3 s on 2 CPU cores


def checkpoint_file(data_root: Path, path: str) -> Path:
    """``path`` (relative to the data root, or absolute inside it) as an existing file inside the root."""
    try:
        resolved = resolve_data_path(data_root, path)
    except DatasetError as exc:
        raise DatasetError(str(exc).replace("dataset path", "checkpoint path", 1)) from None
    if not resolved.is_file():
        raise DatasetError(f"checkpoint path '{path}' is a directory, not a checkpoint file")
    return resolved


def synthetic_windows(spec: InputSpec, n: int = 4) -> np.ndarray:
    """(n, leads, samples) standardised windows of a deterministic ECG-like signal (no randomness)."""
    t = np.arange(spec.samples) / spec.fs
    windows = []
    for i in range(n):
        rate = 1.0 + 0.15 * i  # beats per second
        phase = (t * rate) % 1.0
        beat = np.exp(-(((phase - 0.3) / 0.012) ** 2)) - 0.2 * np.exp(-(((phase - 0.6) / 0.05) ** 2))
        leads = [
            (0.5 + 0.1 * k) * np.roll(beat, 3 * k) + 0.05 * np.sin(2 * np.pi * (0.3 + 0.05 * k) * t)
            for k in range(len(spec.leads))
        ]
        windows.append(np.stack(leads))
    return standardise(np.asarray(windows, dtype=np.float32))


def parity_windows(spec: InputSpec, data_root: Path) -> tuple[np.ndarray, dict]:
    """Windows for the parity check and where they come from (for the stored metrics)."""
    windows, used = check_windows(spec, data_root, PARITY_RECORDS)
    if windows is not None:
        return windows, {"parity_source": "ptbxl", "parity_records": used}
    return synthetic_windows(spec), {
        "parity_source": "synthetic: no PTB-XL record under the data root, windows of a generated signal",
        "parity_records": [],
    }


def import_checkpoint(session: Session, fmt: str, path: str, name: str) -> ModelVersion:
    """Load the ``fmt`` checkpoint at ``path`` (under the data root), export, check and register it."""
    if fmt not in FORMATS:
        raise ClientError(f"unknown checkpoint format '{fmt}': one of {', '.join(FORMATS)}")
    settings = get_settings()
    root = Path(settings.data_root).resolve()
    file = checkpoint_file(root, path)
    existing = session.scalar(select(Model).where(Model.name == name))
    if existing is not None and existing.method != fmt:
        raise ConflictError(
            f"model '{name}' is registered with method '{existing.method}'; an '{fmt}' checkpoint cannot "
            "become one of its versions: choose another name"
        )

    started = time.perf_counter()
    encoder, info = load_encoder(fmt, file)
    if info.leads is None:
        raise ClientError(
            f"checkpoint '{file.name}' has {info.num_leads} lead embeddings; the service feeds the 12 "
            "standard leads, so only 12-lead encoders can be imported"
        )
    spec = InputSpec(leads=info.leads, fs=info.fs, samples=info.samples)
    windows, source = parity_windows(spec, root)

    out_dir = Path(settings.artifact_dir) / "imports" / str(uuid.uuid4())
    onnx_path = out_dir / "encoder.onnx"
    try:
        version = publish(
            encoder,
            windows,
            onnx_path,
            spec,
            lambda published: register_model_version(
                session,
                name=name,
                method=fmt,
                source_job_id=None,
                **published.fields(),
                metrics={
                    "imported_from": str(file.relative_to(root)),
                    "format": fmt,
                    "checkpoint_sha256": sha256_file(file),
                    **info.metrics(),
                    "parity_windows": int(len(windows)),
                    **source,
                },
            ),
            encoder=encoder,
        )
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    log.info(
        "imported %s (%s %s, %d parameters) as %s in %.1f s, parity %.1e",
        file,
        fmt,
        info.size,
        info.parameters,
        version.ref,
        time.perf_counter() - started,
        version.parity_max_abs_diff,
    )
    return version
