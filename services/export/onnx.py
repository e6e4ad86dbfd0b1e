"""Export an encoder to ONNX (dynamic batch axis) and check it against PyTorch on real windows."""

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

INPUT_NAME = "signal"
OUTPUT_NAME = "embedding"


def export_encoder(encoder: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``encoder`` ((B, C, L) -> (B, D)) to ``path`` with a dynamic batch axis (fp32, CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to("cpu").float().eval()
    tmp = path.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            (example.to("cpu").float(),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)


def parity_max_abs_diff(encoder: nn.Module, path: Path, windows: np.ndarray) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime embeddings of ``windows``."""
    encoder = encoder.to("cpu").float().eval()
    with torch.no_grad():
        expected = encoder(torch.from_numpy(windows)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: windows.astype(np.float32)})[0]
    return float(np.abs(expected - got).max())


PARITY_TOLERANCE = 1e-3  # largest PyTorch-vs-ONNX difference a registered model version may have


def export_checked(encoder: nn.Module, windows: np.ndarray, path: Path) -> float:
    """Export ``encoder`` to ``path`` and return its parity on ``windows`` (real records); raise if over
    ``PARITY_TOLERANCE`` (NaN included)."""
    export_encoder(encoder, torch.from_numpy(windows[:1]), path)
    parity = parity_max_abs_diff(encoder, path, windows)
    if not parity <= PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX export disagrees with PyTorch: max abs difference {parity:.2e} > {PARITY_TOLERANCE}"
        )
    return parity


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
