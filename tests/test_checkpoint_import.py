"""Importing official ST-MEM checkpoints: strict loading, ONNX export, registration, refusals.

No official weights exist on these machines, so the checkpoint files are built here with exactly the
official names and shapes (checked against ``../shared/reference/checkpoint-keys.txt``) and seeded random
values: ``{"model": encoder_state}`` (166 tensors for ViT-B) and ``{"model": mae_state}`` (228 tensors).
The data root of these tests is a temporary folder holding those files and copies of four real PTB-XL
records (the shared data is read-only and nothing may be written there); the parity windows of an import
come from those copies, the embeddings compared through ``/embed`` from the real records in place.
"""

import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from services.config import get_settings
from services.db.session import session_scope
from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.errors import ClientError
from services.export.onnx import sha256_file
from services.models.checkpoints import load_encoder, load_st_mem_encoder
from services.models.ecg_jepa import INPUT_SPEC as JEPA_SPEC
from services.models.ecg_jepa import SIZES as JEPA_SIZES
from services.models.ecg_jepa import EcgJepaEncoder
from services.models.st_mem import SIZES, StMemEncoder, StMemMae
from services.registry.checkpoint_import import import_checkpoint

from .conftest import DATA, ROOT, parse_reference

REFERENCE = ROOT.parent / "shared" / "reference" / "checkpoint-keys.txt"
PARITY_COPIES = [f"ptbxl-500/records500/00000/{i:05d}_hr" for i in range(1, 5)]
EMBED_RECORDS = ["ptbxl-500/records500/00000/00010_hr", "ptbxl-500/records500/00000/00011_hr"]
TIMINGS: dict[str, float] = {}


# --------------------------------------------------------------------------------------------------
# the reference listing, and checkpoint files built from the model classes


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    if not REFERENCE.is_file():
        pytest.skip(f"the reference key listing is not at {REFERENCE}")
    sections = parse_reference(REFERENCE)
    assert {"ST-MEM encoder", "ST-MEM full", "ECG-JEPA"} <= set(sections), sorted(sections)
    return sections


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assert_matches_reference(layout: dict[str, tuple[int, ...]], section: dict) -> None:
    """Every listed name with its shape, in order; the tensor and element counts; the last entry."""
    names = list(layout)
    assert len(layout) == section["tensors"] == len(section["listed"]) + section["more"]
    assert sum(int(np.prod(s)) for s in layout.values()) == section["elements"]
    assert names[: len(section["listed"])] == list(section["listed"])
    for name, shape in section["listed"].items():
        assert layout[name] == shape, name
    last_name, last_shape = section["last"]
    assert names[-1] == last_name and layout[last_name] == last_shape


def random_state(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random values of trained-like scale: matrices ~ 1/sqrt(fan_in), norm weights ~ 1."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        scale = shape[-1] ** -0.5 if len(shape) >= 2 else 0.05
        value = torch.randn(shape, generator=g) * scale
        if len(shape) == 1 and re.search(r"(norm|to_patch_embedding\.[13])\.weight$", name):
            value += 1.0  # LayerNorm gains
        state[name] = value
    return state


def full_state(size: str, seed: int) -> dict[str, torch.Tensor]:
    """A full (MAE) state dict of ``size``; the shared patch embedding holds the same tensors twice."""
    with torch.device("meta"):
        layout = shapes(StMemMae(SIZES[size]))
    state = random_state(layout, seed)
    for key in [k for k in state if k.startswith("to_patch_embedding.")]:
        state[key] = state[f"encoder.{key}"]
    return state


def encoder_part(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}


def save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def encoder_from(state: dict[str, torch.Tensor], size: str) -> StMemEncoder:
    """An encoder built independently of the importer, holding ``state``."""
    encoder = StMemEncoder(SIZES[size])
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


# --------------------------------------------------------------------------------------------------
# fixtures: a temporary data root with the checkpoint files and four real records


class Root:
    def __init__(self, path: Path):
        self.path = path
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.path))


@pytest.fixture(scope="module")
def root(reference: dict[str, dict], data_dir: Path) -> Iterator[Root]:
    """The tmp data root: base encoder + full files (~700 MB, deleted after the module), small/tiny files."""
    path = Path(tempfile.mkdtemp(prefix="ecgssl-ckpt-root-"))
    try:
        for record in PARITY_COPIES:  # copies: the parity windows come from the data root
            for suffix in (".hea", ".dat"):
                source = (DATA / record).with_suffix(suffix)
                target = path / source.relative_to(DATA)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        result = Root(path)
        started = time.perf_counter()
        base_full = full_state("base", seed=1)
        with torch.device("meta"):
            assert_matches_reference(shapes(StMemEncoder(SIZES["base"])), reference["ST-MEM encoder"])
            assert_matches_reference(shapes(StMemMae(SIZES["base"])), reference["ST-MEM full"])
        assert_matches_reference({k: tuple(v.shape) for k, v in base_full.items()}, reference["ST-MEM full"])
        result.states["base-full"] = base_full
        result.states["base-encoder"] = encoder_part(base_full)
        save({"model": result.states["base-encoder"]}, path / "ckpt" / "base_encoder.pth")
        save({"model": base_full}, path / "ckpt" / "base_full.pth")
        TIMINGS["build and save the base files"] = time.perf_counter() - started
        for size, seed in (("small", 2), ("tiny", 3)):
            full = full_state(size, seed)
            result.states[f"{size}-full"] = full
            result.states[f"{size}-encoder"] = encoder_part(full)
            save({"model": result.states[f"{size}-encoder"]}, path / "ckpt" / f"{size}_encoder.pth")
            save({"model": full}, path / "ckpt" / f"{size}_full.pth")
        jepa_layout = shapes(EcgJepaEncoder(JEPA_SIZES["base"]))
        assert_matches_reference(jepa_layout, reference["ECG-JEPA"])
        result.states["jepa-base"] = random_state(jepa_layout, seed=4)
        save({"encoder": result.states["jepa-base"]}, path / "ckpt" / "jepa_base.pth")
        yield result
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if TIMINGS:
            print("\ncheckpoint import timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


@pytest.fixture
def at_root(root: Root, monkeypatch: pytest.MonkeyPatch) -> Iterator[Root]:
    """ECGSSL_DATA_ROOT = the tmp root for one test; the cached settings are rebuilt before and after."""
    get_settings.cache_clear()
    monkeypatch.setenv("ECGSSL_DATA_ROOT", str(root.path))
    yield root
    monkeypatch.undo()
    get_settings.cache_clear()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wfdb_upload(record: Path) -> list:
    return [
        ("files", (record.with_suffix(s).name, record.with_suffix(s).read_bytes())) for s in (".hea", ".dat")
    ]


def assert_embeddings_equal(
    client: TestClient, ref: str, encoder: torch.nn.Module, samples: int, spec: InputSpec | None = None
) -> None:
    """/embed (ONNX Runtime) of real PTB-XL records == the PyTorch encoder's, within 1e-4."""
    spec = spec or InputSpec(samples=samples)
    for record in EMBED_RECORDS:
        # fp32: compared at 1e-4 (the default serves the int8 variant where it passed its cosine check)
        response = client.post(
            "/embed", params={"model": ref, "precision": "fp32"}, files=wfdb_upload(DATA / record)
        )
        assert response.status_code == 200, response.text
        windows = preprocess(read_wfdb((DATA / record).with_suffix(".hea")), spec)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(windows)).mean(0).numpy()
        got = np.asarray(response.json()["embedding"])
        assert got.shape == expected.shape and np.abs(expected).max() > 0.1  # a real, non-trivial vector
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# strict loading (in-process)


@pytest.mark.parametrize("layout", ["encoder", "full"])
def test_base_checkpoint_loads_strictly_with_every_tensor_as_saved(root: Root, layout: str) -> None:
    started = time.perf_counter()
    encoder, info = load_st_mem_encoder(root.path / "ckpt" / f"base_{layout}.pth")
    TIMINGS[f"load base {layout}"] = time.perf_counter() - started
    assert (info.format, info.layout, info.size) == ("st_mem", layout, "base")
    assert info.tensors == {"encoder": 166, "full": 228}[layout]
    assert info.parameters == 85_150_614 and info.embedding_dim == 768
    assert (info.samples, info.fs, info.num_leads) == (2250, 250.0, 12)
    loaded = encoder.state_dict()
    saved = root.states["base-encoder"]
    assert list(loaded) == list(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_small_and_tiny_sizes_are_recognised_from_the_shapes(root: Root) -> None:
    for size in ("small", "tiny"):
        for layout in ("encoder", "full"):
            encoder, info = load_encoder("st_mem", root.path / "ckpt" / f"{size}_{layout}.pth")
            assert (info.size, info.layout, info.embedding_dim) == (size, layout, SIZES[size].width)
            assert encoder.cfg == SIZES[size]
            for name, tensor in root.states[f"{size}-encoder"].items():
                assert torch.equal(encoder.state_dict()[name], tensor), name


def test_a_bare_state_dict_loads_too(root: Root, tmp_path: Path) -> None:
    path = save(root.states["tiny-encoder"], tmp_path / "bare.pth")
    _, info = load_st_mem_encoder(path)
    assert info.layout == "encoder" and info.tensors == 46


def test_a_missing_block_in_a_base_file_is_refused_naming_the_keys(root: Root, tmp_path: Path) -> None:
    state = {k: v for k, v in root.states["base-encoder"].items() if not k.startswith("block5.")}
    path = save({"model": state}, tmp_path / "base_no_block5.pth")
    with pytest.raises(ClientError) as caught:
        load_st_mem_encoder(path)
    message = str(caught.value)
    assert "ST-MEM base encoder layout" in message and "166 tensors; the file has 154" in message
    assert "12 missing key(s): block5.attn.norm.weight" in message


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ClientError, match="unknown checkpoint format 'nope': one of st_mem, ecg_jepa"):
        load_encoder("nope", Path("x.pth"))


# --------------------------------------------------------------------------------------------------
# POST /models/import: the round trip


def test_import_base_encoder_file_and_embed_real_records(client: TestClient, at_root: Root) -> None:
    name = unique("st-mem-base")
    started = time.perf_counter()
    response = client.post(
        "/models/import", json={"format": "st_mem", "path": "ckpt/base_encoder.pth", "name": name}
    )
    TIMINGS["POST /models/import base encoder"] = time.perf_counter() - started
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ref"] == f"{name}@1" and body["method"] == "st_mem" and body["source_job_id"] is None
    assert body["embedding_dim"] == 768 and body["input_spec"]["samples"] == 2250
    assert body["input_spec"]["fs"] == 250 and len(body["input_spec"]["leads"]) == 12
    assert body["parity_max_abs_diff"] < 1e-4 and len(body["sha256"]) == 64
    metrics = body["metrics"]
    assert metrics["imported_from"] == "ckpt/base_encoder.pth" and metrics["format"] == "st_mem"
    assert metrics["checkpoint_sha256"] == sha256_file(at_root.path / "ckpt" / "base_encoder.pth")
    assert metrics["parameters"] == 85_150_614 and metrics["checkpoint_tensors"] == 166
    assert metrics["layout"] == "encoder" and metrics["model_size"] == "base"
    assert metrics["parity_source"] == "ptbxl" and metrics["parity_records"] == PARITY_COPIES
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert listed[name]["versions"][0]["ref"] == f"{name}@1"
    onnx_files = list((get_settings().artifact_dir / "imports").glob("*/encoder.onnx"))
    assert any(sha256_file(f) == body["sha256"] for f in onnx_files)

    started = time.perf_counter()
    assert_embeddings_equal(client, f"{name}@1", encoder_from(at_root.states["base-encoder"], "base"), 2250)
    TIMINGS["embed 2 records with the base model"] = time.perf_counter() - started


def test_import_ecg_jepa_file_and_embed_real_records(client: TestClient, at_root: Root) -> None:
    """An official-layout ECG-JEPA encoder file (137 tensors under 'encoder'): strict load, ONNX with
    CroPA, parity on real records, /embed equal to the PyTorch encoder on 8 leads at 250 Hz."""
    name = unique("ecg-jepa-base")
    started = time.perf_counter()
    response = client.post(
        "/models/import", json={"format": "ecg_jepa", "path": "ckpt/jepa_base.pth", "name": name}
    )
    TIMINGS["POST /models/import ECG-JEPA base"] = time.perf_counter() - started
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["method"] == "ecg_jepa" and body["embedding_dim"] == 768
    assert body["input_spec"]["leads"] == list(JEPA_SPEC.leads) and body["input_spec"]["samples"] == 2500
    assert body["parity_max_abs_diff"] < 1e-3
    assert body["metrics"]["checkpoint_tensors"] == 137 and body["metrics"]["format"] == "ecg_jepa"
    encoder = EcgJepaEncoder(JEPA_SIZES["base"]).eval()
    encoder.load_state_dict(at_root.states["jepa-base"], strict=True)
    assert_embeddings_equal(client, f"{name}@1", encoder, 2500, JEPA_SPEC)


def test_import_full_file_registers_its_encoder_as_the_next_version(
    client: TestClient, at_root: Root
) -> None:
    name = unique("st-mem-small")
    for expected_version, layout in ((1, "encoder"), (2, "full")):
        started = time.perf_counter()
        response = client.post(
            "/models/import", json={"format": "st_mem", "path": f"ckpt/small_{layout}.pth", "name": name}
        )
        TIMINGS[f"POST /models/import small {layout}"] = time.perf_counter() - started
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["version"] == expected_version and body["metrics"]["layout"] == layout
        assert body["metrics"]["checkpoint_tensors"] == {"encoder": 166, "full": 228}[layout]
        assert body["embedding_dim"] == 384
    # the same encoder weights in both files: the same embeddings from both versions
    encoder = encoder_from(at_root.states["small-encoder"], "small")
    assert_embeddings_equal(client, f"{name}@1", encoder, 2250)
    assert_embeddings_equal(client, f"{name}@2", encoder, 2250)


def test_import_without_real_records_uses_a_generated_signal_and_says_so(
    root: Root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare_root = tmp_path / "root"
    shutil.copytree(
        root.path / "ckpt", bare_root / "ckpt", ignore=shutil.ignore_patterns("base_*", "small_*")
    )
    get_settings.cache_clear()
    monkeypatch.setenv("ECGSSL_DATA_ROOT", str(bare_root))
    try:
        with session_scope() as s:
            version = import_checkpoint(s, "st_mem", "ckpt/tiny_full.pth", unique("tiny-synthetic"))
            metrics, parity = dict(version.metrics), version.parity_max_abs_diff
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert metrics["parity_source"].startswith("synthetic") and metrics["parity_records"] == []
    assert metrics["parity_windows"] == 4 and parity < 1e-4


# --------------------------------------------------------------------------------------------------
# refusals


def _renamed(state: dict) -> dict:
    return {
        k.replace("block0.attn.fn.to_qkv.weight", "block0.attn.fn.qkv.weight"): v for k, v in state.items()
    }


def _reshaped(state: dict) -> dict:
    return {**state, "block1.ff.fn.net.0.weight": state["block1.ff.fn.net.0.weight"][:-1]}


def _without_block(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("block1.")}


def _with_nan(state: dict) -> dict:
    bad = state["norm.weight"].clone()
    bad[3] = float("nan")
    return {**state, "norm.weight": bad}


def _jepa_state(reference: dict) -> dict:
    section = reference["ECG-JEPA"]
    g = torch.Generator().manual_seed(4)
    return {k: torch.randn(s, generator=g) for k, s in section["listed"].items()}


class _RunsCode:
    """Unpickling this would create the file ``marker`` (it must never happen)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _small_full_without_decoder_block(r: Root) -> dict:
    return {k: v for k, v in r.states["small-full"].items() if "decoder_blocks.3" not in k}


def _unshared_patch_embedding(r: Root) -> dict:
    state = r.states["tiny-full"]
    return {**state, "to_patch_embedding.2.bias": state["to_patch_embedding.2.bias"] + 1.0}


def _unknown_width(r: Root) -> dict:
    return {**r.states["tiny-encoder"], "to_patch_embedding.2.weight": torch.zeros(100, 75)}


# case: (checkpoint object from (root, reference, tmp_path), texts the 422 detail must contain)
BAD_FILES = {
    "renamed key": (
        lambda r, ref, tmp: {"model": _renamed(r.states["small-encoder"])},
        [
            "ST-MEM small encoder layout",
            "missing key(s): block0.attn.fn.to_qkv.weight",
            "unexpected key(s): block0.attn.fn.qkv.weight",
        ],
    ),
    "wrong shape": (
        lambda r, ref, tmp: {"model": _reshaped(r.states["small-encoder"])},
        ["shape mismatch(es): block1.ff.fn.net.0.weight is (1535, 384) in the file, expected (1536, 384)"],
    ),
    "missing block": (
        lambda r, ref, tmp: {"model": _without_block(r.states["small-encoder"])},
        ["12 missing key(s): block1.attn.norm.weight", "166 tensors; the file has 154"],
    ),
    "full file without a decoder block": (
        lambda r, ref, tmp: {"model": _small_full_without_decoder_block(r)},
        [
            "ST-MEM small full (masked autoencoder) layout",
            "missing key(s): decoder_blocks.3.attn.norm.weight",
        ],
    ),
    "full file with two different patch embeddings": (
        lambda r, ref, tmp: {"model": _unshared_patch_embedding(r)},
        ["to_patch_embedding.2.bias differ(s) from encoder.to_patch_embedding.2.bias", "shared module"],
    ),
    "unknown width": (
        lambda r, ref, tmp: {"model": _unknown_width(r)},
        ["width 100", "no known ST-MEM size"],
    ),
    "ECG-JEPA file (key 'encoder')": (
        lambda r, ref, tmp: {"encoder": _jepa_state(ref), "epoch": 100},
        ["no 'model' entry", "encoder, epoch", "ECG-JEPA"],
    ),
    "ECG-JEPA state under 'model'": (
        lambda r, ref, tmp: {"model": _jepa_state(ref)},
        ["looks like an ECG-JEPA encoder", "pos_embed"],
    ),
    "NaN weights": (
        lambda r, ref, tmp: {"model": _with_nan(r.states["tiny-encoder"])},
        ["NaN or inf: norm.weight"],
    ),
    "not a state dict": (lambda r, ref, tmp: {"model": {"a": 1}}, ["not tensors: a"]),
    "pickled code": (
        lambda r, ref, tmp: {"model": r.states["tiny-encoder"], "hook": _RunsCode(tmp / "executed")},
        ["was refused", "could run code"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_checkpoints_of_another_layout_get_422_naming_the_problem(
    client: TestClient, at_root: Root, reference: dict, tmp_path: Path, case: str
) -> None:
    make, expected = BAD_FILES[case]
    bad_dir = at_root.path / "bad" / uuid.uuid4().hex
    path = save(make(at_root, reference, tmp_path), bad_dir / "checkpoint.pth")
    name = unique("refused")
    try:
        response = client.post(
            "/models/import", json={"format": "st_mem", "path": at_root.rel(path), "name": name}
        )
    finally:
        shutil.rmtree(bad_dir)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    for text in expected:
        assert text in detail, detail
    assert not (tmp_path / "executed").exists(), "the checkpoint's pickled code ran"
    assert name not in {m["name"] for m in client.get("/models").json()["models"]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello, I am not a checkpoint\n", "not a PyTorch checkpoint"),
        (b"", "not a PyTorch checkpoint"),
        (b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", "not a PyTorch"),
        (b"PK\x03\x04 a broken zip", "not a PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_not_a_torch_checkpoint_gets_422(
    client: TestClient, at_root: Root, content: bytes, expected: str
) -> None:
    path = at_root.path / "bad" / f"{uuid.uuid4().hex}.pth"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    try:
        response = client.post(
            "/models/import", json={"format": "st_mem", "path": at_root.rel(path), "name": "x"}
        )
    finally:
        path.unlink()
    assert response.status_code == 422 and expected in response.json()["detail"], response.text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"path": "../etc/passwd"}, "outside the data root"),
        ({"path": "/etc/passwd"}, "outside the data root"),
        ({"path": "ckpt/no_such.pth"}, "checkpoint path 'ckpt/no_such.pth' does not exist"),
        ({"path": "ckpt"}, "is a directory"),
        ({"format": "nope"}, "format"),
        ({"format": "ecg_jepa"}, "ECG-JEPA"),  # an ST-MEM file imported as ECG-JEPA: the layout is named
        ({"name": "has spaces"}, "name"),
        ({"name": ""}, "name"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_import_requests_get_422(client: TestClient, at_root: Root, body: dict, expected: str) -> None:
    request = {"format": "st_mem", "path": "ckpt/tiny_encoder.pth", "name": unique("bad"), **body}
    response = client.post("/models/import", json=request)
    assert response.status_code == 422, response.text
    assert expected in response.text


def test_a_symlink_out_of_the_data_root_is_refused(client: TestClient, at_root: Root, tmp_path: Path) -> None:
    outside = save({"model": at_root.states["tiny-encoder"]}, tmp_path / "outside.pth")
    link = at_root.path / "bad" / f"{uuid.uuid4().hex}.pth"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(outside)
    try:
        response = client.post(
            "/models/import", json={"format": "st_mem", "path": at_root.rel(link), "name": "x"}
        )
    finally:
        link.unlink()
    assert response.status_code == 422 and "outside the data root" in response.json()["detail"]


def test_import_needs_the_api_key_when_one_is_set(
    client: TestClient, at_root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ECGSSL_API_KEY", "s3cret")
    get_settings.cache_clear()
    body = {"format": "st_mem", "path": "ckpt/no_such.pth", "name": unique("auth")}
    assert client.post("/models/import", json=body).status_code == 401
    wrong = client.post("/models/import", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    passed = client.post("/models/import", json=body, headers={"Authorization": "Bearer s3cret"})
    assert passed.status_code == 422 and "does not exist" in passed.json()["detail"]  # past the key check


def test_import_is_listed_in_the_openapi_docs(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/models/import"]["post"]
    assert "201" in operation["responses"] and "422" in operation["responses"]
