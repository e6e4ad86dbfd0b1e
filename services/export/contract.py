"""What an exported ONNX file is to the service, without torch: its input and output names and its
digest. ``services.export.onnx`` (torch) writes such files; serving (``services.inference``) reads them."""

import hashlib
from pathlib import Path

INPUT_NAME = "signal"
OUTPUT_NAME = "embedding"
PROBABILITIES_NAME = "probabilities"
HEAD_OUTPUTS = (OUTPUT_NAME, PROBABILITIES_NAME)
PARITY_TOLERANCE = 1e-3  # largest PyTorch-vs-ONNX difference a registered model version may have


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
