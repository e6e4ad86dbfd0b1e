"""The diagnosis model that ships with the repository, registered on first start.

``models/default/`` holds a version made by ``reports/default_model.py`` (the repo's own command: recipe,
data, seed and time in its ``version.json`` and ``MODEL_CARD.md``): its ONNX graph, PyTorch weights (what a
further fine-tuning starts from), kNN reference set and registry fields. ``register_shipped_model`` copies
the files into the artifact store and registers them like any trained version (variants made and checked
here, on this machine; as a first version it gets the ``production`` alias), so that ``make run`` and ``docker
compose up`` serve ``/predict`` and ``/embed`` at once. It runs once per database: a model of that name
already registered (by an earlier start, or a user) is left alone.
"""

import json
import logging
import shutil
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.models import Model, ModelVersion
from services.ecg.preprocess import InputSpec
from services.export.contract import sha256_file

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "models" / "default"
MANIFEST = "version.json"
FILES = ("model.onnx", "encoder.pt", "downstream.pt", "knn_reference.npz")


def export_version(version: ModelVersion, folder: Path, provenance: dict, card: str) -> Path:
    """Write a registered version's files and registry fields into ``folder`` (``models/default``)."""
    source = Path(version.onnx_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, folder / name)
    reference = dict(version.knn_reference or {})
    reference.pop("file", None)
    manifest = {
        "name": version.model.name,
        "method": version.model.method,
        "sha256": version.sha256,
        "input_spec": version.input_spec,
        "embedding_dim": version.embedding_dim,
        "parity_max_abs_diff": version.parity_max_abs_diff,
        "metrics": version.metrics,
        "head": version.head,
        "knn_reference": reference,
        "provenance": provenance,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (folder / "MODEL_CARD.md").write_text(card)
    return folder


def register_shipped_model(session: Session, folder: Path = SHIPPED_DIR) -> ModelVersion | None:
    """Register the shipped model unless a model of its name exists; None when there is none to ship."""
    from services.export.variants import make_variants  # (imports ONNX Runtime)
    from services.registry import register_model_version

    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if session.scalar(select(Model).where(Model.name == manifest["name"])) is not None:
        return None
    if sha256_file(folder / "model.onnx") != manifest["sha256"]:
        log.error("the shipped model's ONNX file does not match its sha256: not registered")
        return None
    target = Path(get_settings().artifact_dir) / "shipped" / manifest["sha256"][:16]
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(folder / name, target / name)
    reference = {**manifest["knn_reference"], "file": str((target / "knn_reference.npz").resolve())}
    onnx_path = (target / "model.onnx").resolve()
    spec = InputSpec.from_dict(manifest["input_spec"])
    version = register_model_version(
        session,
        name=manifest["name"],
        method=manifest["method"],
        source_job_id=None,
        onnx_path=str(onnx_path),
        sha256=manifest["sha256"],
        input_spec=manifest["input_spec"],
        embedding_dim=manifest["embedding_dim"],
        parity_max_abs_diff=manifest["parity_max_abs_diff"],
        metrics={**manifest["metrics"], "shipped": manifest["provenance"]},
        head=manifest["head"],
        knn_reference=reference,
        variants=make_variants(onnx_path, spec, sha256=manifest["sha256"]),
    )
    log.info("registered the shipped model %s (production)", version.ref)
    return version


@lru_cache
def shipped_model_name(folder: Path = SHIPPED_DIR) -> str | None:
    """The registry name of the shipped model (what a request naming no model serves by default), or None
    when this checkout ships none."""
    manifest_path = folder / MANIFEST
    return json.loads(manifest_path.read_text())["name"] if manifest_path.is_file() else None


def register_on_first_start() -> None:
    """At start-up: register the shipped model if the settings allow it; never fails the start."""
    from services.db.session import session_scope

    if not get_settings().ship_default_model:
        return
    try:
        with session_scope() as s:
            register_shipped_model(s)
    except Exception:  # a second API process racing on the same database, a read-only store, ...
        log.exception("the shipped model was not registered")
