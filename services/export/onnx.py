"""Export an encoder to ONNX (dynamic batch axis) and check it against PyTorch on real windows.

An embedding model has one output, ``embedding`` (B, D). A diagnosis model (encoder + head) returns the
tuple (embedding (B, D), probabilities (B, K)) and is exported with ``outputs=HEAD_OUTPUTS``: its graph
has both outputs, so ``/embed`` serves it like any encoder and ``/predict`` reads ``probabilities``.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

# the file's names and digest are torch-free (serving reads them); importable from here too
from services.export.contract import HEAD_OUTPUTS as HEAD_OUTPUTS
from services.export.contract import INPUT_NAME, OUTPUT_NAME
from services.export.contract import PARITY_TOLERANCE as PARITY_TOLERANCE
from services.export.contract import PROBABILITIES_NAME as PROBABILITIES_NAME
from services.export.contract import sha256_file as sha256_file


def export_encoder(
    encoder: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...] = (OUTPUT_NAME,)
) -> None:
    """Write ``encoder`` ((B, C, L) -> (B, D), or a tuple with one (B, ...) tensor per name in ``outputs``)
    to ``path`` with a dynamic batch axis (fp32, CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to("cpu").float().eval()
    tmp = path.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            (example.to("cpu").float(),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)


def parity_max_abs_diff(
    encoder: nn.Module, path: Path, windows: np.ndarray, outputs: tuple[str, ...] = (OUTPUT_NAME,)
) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime outputs (all of them) on ``windows``."""
    encoder = encoder.to("cpu").float().eval()
    with torch.no_grad():
        expected = encoder(torch.from_numpy(windows))
    expected = expected if isinstance(expected, tuple) else (expected,)
    if len(expected) != len(outputs):
        raise ValueError(f"the model returns {len(expected)} output(s), {len(outputs)} named: {outputs}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(outputs), {INPUT_NAME: windows.astype(np.float32)})
    return max(float(np.abs(e.numpy() - g).max()) for e, g in zip(expected, got, strict=True))


def export_checked(
    encoder: nn.Module, windows: np.ndarray, path: Path, outputs: tuple[str, ...] = (OUTPUT_NAME,)
) -> float:
    """Export ``encoder`` to ``path`` and return its parity on ``windows`` (real records), over every output;
    raise if over ``PARITY_TOLERANCE`` (NaN included)."""
    export_encoder(encoder, torch.from_numpy(windows[:1]), path, outputs)
    parity = parity_max_abs_diff(encoder, path, windows, outputs)
    if not parity <= PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX export disagrees with PyTorch: max abs difference {parity:.2e} > {PARITY_TOLERANCE}"
        )
    return parity
