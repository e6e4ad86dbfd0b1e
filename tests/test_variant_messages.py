"""The variant checks say, in plain words, which figure decided them and against which bound (on the shipped
diagnosis model's real ONNX graph and real PTB-XL check records)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from services.ecg.preprocess import InputSpec
from services.errors import ClientError
from services.export import variants
from services.export.variants import check_head_variants, check_windows, make_variants, variant_verdict
from services.inference.sessions import ServedModel, plan_session
from services.registry.shipped import SHIPPED_DIR


@pytest.fixture
def shipped(tmp_path: Path, data_dir: Path, settings_env: pytest.MonkeyPatch) -> tuple[Path, InputSpec]:
    """A copy of the shipped model's ONNX graph, and its input spec."""
    onnx_path = tmp_path / "model.onnx"
    shutil.copyfile(SHIPPED_DIR / "model.onnx", onnx_path)
    manifest = json.loads((SHIPPED_DIR / "version.json").read_text())
    return onnx_path, InputSpec.from_dict(manifest["input_spec"])


def served_with(onnx_path: Path, spec: InputSpec, made: dict) -> ServedModel:
    return ServedModel(1, "shipped-copy", 1, str(onnx_path), made["fp32"]["sha256"], spec, 64, variants=made)


def test_a_failed_cosine_check_names_the_lowest_cosine_and_its_bound(
    shipped: tuple[Path, InputSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx_path, spec = shipped
    monkeypatch.setattr(variants, "MIN_COSINE", 1.0)  # int8 is never exactly fp32: the check must fail
    int8 = make_variants(onnx_path, spec, which=["int8"])["int8"]
    assert int8["status"] == "failed" and int8["threshold"] == 1.0
    reason = int8["reason"]
    assert re.fullmatch(
        r"int8: lowest cosine to the fp32 embedding over 8 check windows 0\.\d{4,}, below the required 1\.0 "
        r"for every window \(mean 0\.\d{4,}\)",
        reason,
    ), reason
    shown = float(reason.split("check windows ")[1].split(",")[0])
    assert shown == pytest.approx(int8["cosine_min"], abs=1e-4) and shown < 1.0
    with pytest.raises(ClientError) as refused:
        model = served_with(onnx_path, spec, {"fp32": {"sha256": "x"}, "int8": int8})
        plan_session(model, "int8", strict=True)
    assert f"the int8 variant of shipped-copy@1 is failed: {reason}" in str(refused.value)


def test_a_failed_probability_check_does_not_blame_the_cosine(
    shipped: tuple[Path, InputSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's message: a variant whose embedding passed (cosine 0.99999 >= 0.999) but whose
    probabilities failed was reported as 'cosine to fp32 0.999993 < 0.999'."""
    onnx_path, spec = shipped
    made = make_variants(onnx_path, spec, which=["int8"])
    assert made["int8"]["status"] == "passed", made["int8"]
    passed = variant_verdict("int8", made["int8"])
    assert (
        passed.startswith("int8: lowest cosine to the fp32 embedding over 8")
        and "at least the required 0.999" in passed
    )
    windows, _ = check_windows(spec)
    monkeypatch.setattr(variants, "PROBABILITY_TOLERANCE", 0.0)  # any int8 difference fails it
    check_head_variants(made, onnx_path, windows)
    int8 = made["int8"]
    assert int8["status"] == "failed" and int8["probabilities_max_abs_diff"] > 0
    diff = f"{int8['probabilities_max_abs_diff']:.4f}"
    assert int8["reason"].startswith(
        f"int8: probabilities differ from fp32 by up to {diff} on 8 check windows, above the allowed 0.0 "
        "(its embedding passed: lowest cosine 0.9"
    ), int8["reason"]
    with pytest.raises(ClientError) as refused:
        plan_session(served_with(onnx_path, spec, made), "int8", strict=True)
    assert int8["reason"] in str(refused.value) and "<" not in str(refused.value)


def test_figures_near_the_bound_are_shown_with_the_decimals_that_tell_them_apart() -> None:
    entry = {"threshold": 0.999, "cosine_min": 0.99895, "cosine_mean": 0.99995, "check_records": ["a", "b"]}
    assert variant_verdict("int8", {**entry, "status": "failed"}) == (
        "int8: lowest cosine to the fp32 embedding over 2 check windows 0.99895, below the required 0.999 "
        "for every window (mean 0.99995)"
    )
    error = {"status": "error", "error": "RuntimeError: no kernel"}
    assert variant_verdict("fp16", error) == "fp16: could not be made: RuntimeError: no kernel"
