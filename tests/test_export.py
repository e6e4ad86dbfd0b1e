"""ONNX export of a tiny ST-MEM encoder, checked with ONNX Runtime on real PTB-XL windows."""

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.export.onnx import INPUT_NAME, OUTPUT_NAME, export_encoder, parity_max_abs_diff, sha256_file
from services.models.st_mem import SIZES, StMemMae


@pytest.fixture(scope="module")
def windows(ptbxl_dir: Path) -> np.ndarray:
    """Sliding windows of three real PTB-XL records (2 per 10 s record): (6, 12, 2250) float32."""
    spec = InputSpec()
    parts = [
        preprocess(read_wfdb(ptbxl_dir / "records500" / "00000" / f"{i:05d}_hr.hea"), spec)
        for i in (1, 7, 12)
    ]
    assert all(p.shape == (2, 12, 2250) for p in parts)
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, windows: np.ndarray):
    torch.manual_seed(0)
    encoder = StMemMae(SIZES["tiny"]).encoder  # the MAE's init: random lead/SEP embeddings, xavier weights
    path = tmp_path_factory.mktemp("onnx") / "sub" / "encoder.onnx"
    export_encoder(encoder, torch.from_numpy(windows[:1]), path)
    return encoder, path


def test_export_writes_one_file(exported):
    _, path = exported
    assert path.is_file()
    assert path.stat().st_size > 100_000  # tiny encoder: ~0.2 M float32 weights
    assert [p.name for p in path.parent.iterdir()] == ["encoder.onnx"]  # no .tmp left behind


def test_onnx_runtime_dynamic_batch(exported, windows: np.ndarray):
    encoder, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    assert session.get_inputs()[0].shape[1:] == [12, 2250]
    with torch.no_grad():
        expected = encoder.eval()(torch.from_numpy(windows)).numpy()
    for batch in (1, 5):
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: windows[:batch]})
        assert got.shape == (batch, 64)
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4)
    # the embedding depends on the record
    assert np.abs(expected[0] - expected[2]).max() > 1e-3


def test_parity_on_real_windows(exported, windows: np.ndarray):
    encoder, path = exported
    diff = parity_max_abs_diff(encoder, path, windows)
    assert 0.0 <= diff < 1e-4
    # the check does catch a different model: the same file against other weights
    torch.manual_seed(1)
    other = StMemMae(SIZES["tiny"]).encoder
    assert parity_max_abs_diff(other, path, windows) > 1e-2


def test_sha256_file(exported, tmp_path: Path):
    _, path = exported
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    big = tmp_path / "big.bin"  # more than one 1 MiB chunk
    big.write_bytes(np.random.default_rng(0).bytes(3 * (1 << 20) + 17))
    assert sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
