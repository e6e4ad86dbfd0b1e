"""How a model becomes a served version: export -> parity -> variants -> head checks -> register.

``publish`` is the one path of every trained or imported model (pretraining, fine-tuning, checkpoint
import): it exports the model to ONNX and checks it against PyTorch on real windows
(``services.export.onnx``), saves the encoder beside it (``encoder.pt``: what a further fine-tuning starts
from), makes and checks the reduced-precision variants (``services.export.variants``; a diagnosis model's
also on its probabilities), then hands the measured fields to ``register``, which writes the row
(``services.registry.register_model_version``, inside whatever transaction the caller holds). Between the
steps it reports a phase and gives the caller a chance to stop (a job's cancel); an export that is not
registered leaves no ONNX file behind.

Re-make the variants of a registered version (e.g. one registered before variants existed, or fp16 on a
machine with a GPU)::

    python -m services.registry.publish name@version [--variants int8,fp16]
"""

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from services.ecg.preprocess import InputSpec
from services.export.onnx import OUTPUT_NAME, PROBABILITIES_NAME, export_checked, sha256_file
from services.export.variants import (
    VARIANT_NAMES,
    check_head_variants,
    discard_exported,
    make_variants,
    variant_verdict,
    variants_to_make,
)
from services.models.checkpoints import ENCODER_FILE, save_encoder

log = logging.getLogger(__name__)

T = TypeVar("T")


class Steps(Protocol):
    """What a publication reports to (a job's ``JobReporter``): each step's phase, and a cancel check
    between steps (raising to stop)."""

    def phase(self, text: str) -> None: ...

    def check_cancel(self, where: str) -> None: ...


class LoggedSteps:
    """Steps that are only logged and never stop (a checkpoint import inside a request)."""

    def phase(self, text: str) -> None:
        log.info("publishing: %s", text)

    def check_cancel(self, where: str) -> None:
        return None


@dataclass(frozen=True)
class Published:
    """What publishing wrote and measured: the registry fields of the model's files."""

    onnx_path: str
    sha256: str
    input_spec: dict
    embedding_dim: int
    parity_max_abs_diff: float
    variants: dict

    def fields(self) -> dict:
        """As keywords of ``register_model_version``."""
        return dataclasses.asdict(self)


def publish(
    model: nn.Module,
    windows: np.ndarray,
    onnx_path: Path,
    spec: InputSpec,
    register: Callable[[Published], T],
    *,
    outputs: tuple[str, ...] = (OUTPUT_NAME,),
    encoder: nn.Module | None = None,
    steps: Steps | None = None,
) -> T:
    """Export ``model`` ((B, C, L) -> embedding, or a tuple named by ``outputs``) to ``onnx_path``, check
    it on ``windows`` (real records: parity, variants, head), save ``encoder`` beside it, and return
    ``register(published)``. The ONNX files are removed when any step fails or is cancelled."""
    steps = steps or LoggedSteps()
    try:
        steps.check_cancel("before export")
        steps.phase("exporting to ONNX and checking parity")
        model = model.cpu().float().eval()
        parity = export_checked(model, windows, onnx_path, outputs)
        if encoder is not None:
            save_encoder(encoder, onnx_path.with_name(ENCODER_FILE))
        with torch.no_grad():
            first = model(torch.from_numpy(windows[:1]))
        embedding_dim = int((first[0] if isinstance(first, tuple) else first).shape[-1])
        steps.check_cancel("after export")
        steps.phase("making and checking the ONNX variants")
        sha256 = sha256_file(onnx_path)
        variants = make_variants(onnx_path, spec, sha256=sha256)
        if PROBABILITIES_NAME in outputs:
            check_head_variants(variants, onnx_path, windows)
        steps.check_cancel("after the ONNX variants")
        published = Published(
            onnx_path=str(onnx_path.resolve()),
            sha256=sha256,
            input_spec=spec.to_dict(),
            embedding_dim=embedding_dim,
            parity_max_abs_diff=parity,
            variants=variants,
        )
        return register(published)
    except BaseException:
        discard_exported(onnx_path)
        raise


def main(argv: list[str] | None = None) -> None:
    """Re-make the variants of a registered version and store them on it."""
    from services.db.session import session_scope
    from services.registry import resolve_model_version

    parser = argparse.ArgumentParser(description="Re-make the ONNX variants of a registered version.")
    parser.add_argument("ref", help="name@version (or name, name@alias)")
    parser.add_argument("--variants", default=None, help="comma-separated: int8, fp16 (default: the setting)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    which = variants_to_make(args.variants)
    unknown = sorted(set(which) - set(VARIANT_NAMES))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: {', '.join(VARIANT_NAMES)}")
    with session_scope() as session:
        version = resolve_model_version(session, args.ref)
        spec = InputSpec.from_dict(version.input_spec)
        version.variants = make_variants(Path(version.onnx_path), spec, sha256=version.sha256, which=which)
        for name, entry in version.variants.items():
            shown = variant_verdict(name, entry) if name != "fp32" else "fp32: the reference"
            print(f"{version.ref} {entry['status']}: {shown}")


if __name__ == "__main__":
    main()
