"""ONNX variants of a model version, made when it is registered, each checked against fp32 on real ECGs.

- ``fp32``: the exported file itself (the reference).
- ``int8``: ONNX Runtime dynamic quantisation (``quantize_dynamic``: int8 weights, activations quantised
  per run) for the CPU provider.
- ``fp16``: weights and activations in half precision (inputs and outputs stay fp32) for the CUDA provider;
  made by default only where ONNX Runtime has CUDA (``ECGSSL_EXPORT_VARIANTS``).

A reduced-precision variant serves only when the cosine similarity of its embeddings to the fp32 ones is
at least ``MIN_COSINE`` for every window of ``CHECK_RECORDS`` real PTB-XL records under the data root
(centre windows, the serving preprocessing). Without such records it is stored as ``unchecked`` and never
chosen automatically. The result (file, sha256, cosine min/mean, max abs difference, records, status) is
stored on the version (``model_versions.variants``).

A diagnosis model's variants are also checked on its probabilities (``check_head_variants``). Re-make the
variants of a registered version: ``python -m services.registry.publish name@version``.
"""

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.config import get_settings
from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.errors import EcgInputError
from services.export.contract import INPUT_NAME, OUTPUT_NAME, PROBABILITIES_NAME, sha256_file

log = logging.getLogger(__name__)

MIN_COSINE = 0.999  # a variant serves only when every check window's embedding is at least this close
CHECK_RECORDS = 8
_PTBXL_PATTERNS = ("*/records500/*/*_hr.hea", "*/records100/*/*_lr.hea")
CUDA = "CUDAExecutionProvider"
PROBABILITY_TOLERANCE = 0.01  # a reduced-precision variant of a diagnosis model serves only this close


VARIANT_NAMES = ("int8", "fp16")


def variant_path(onnx_path: Path, name: str) -> Path:
    """Where the ``name`` variant of the fp32 file ``onnx_path`` is written (beside it)."""
    return onnx_path.with_name(f"{onnx_path.stem}.{name}.onnx")


def discard_exported(onnx_path: Path) -> None:
    """Remove the fp32 file ``onnx_path``, its variants and their partial files (an export that will not
    be registered, e.g. of a cancelled job)."""
    for written in [onnx_path, *(variant_path(onnx_path, name) for name in VARIANT_NAMES)]:
        written.unlink(missing_ok=True)
        written.with_suffix(".tmp").unlink(missing_ok=True)  # (written as .tmp, then renamed)


def variants_to_make(setting: str | None = None) -> list[str]:
    """Reduced-precision variants to make under ``ECGSSL_EXPORT_VARIANTS`` (auto: int8, + fp16 on CUDA)."""
    setting = setting or get_settings().export_variants
    if setting == "none":
        return []
    if setting == "auto":
        return ["int8", "fp16"] if CUDA in ort.get_available_providers() else ["int8"]
    return [v for v in setting.split(",") if v]


def check_windows(
    spec: InputSpec, data_root: Path | None = None, count: int = CHECK_RECORDS
) -> tuple[np.ndarray | None, list[str]]:
    """Centre windows of up to ``count`` real PTB-XL records under the data root (PhysioNet's layout, 500 Hz
    files, else 100 Hz; only files that resolve inside the root), and their names relative to the root;
    (None, []) when there are none."""
    root = Path(data_root or get_settings().data_root).resolve()
    if not root.is_dir():
        return None, []
    for pattern in _PTBXL_PATTERNS:
        windows, used = [], []
        for header in sorted(root.glob(pattern)):
            if root not in header.resolve().parents:
                continue
            try:
                windows.append(preprocess(read_wfdb(header), spec, "center")[0])
            except EcgInputError as exc:
                log.warning("variant check record %s skipped: %s", header, exc)
                continue
            used.append(str(header.relative_to(root).with_suffix("")))
            if len(windows) == count:
                break
        if windows:
            return np.stack(windows), used
    return None, []


def compare(reference: np.ndarray, got: np.ndarray) -> dict:
    """Cosine similarity per row (min, mean) and the largest absolute difference."""
    reference, got = reference.astype(np.float64), got.astype(np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1)
    cosine = (reference * got).sum(axis=1) / np.maximum(norms, 1e-30)
    cosine = np.where(np.isfinite(cosine), cosine, -1.0)
    return {
        "cosine_min": round(float(cosine.min()), 7),
        "cosine_mean": round(float(cosine.mean()), 7),
        "max_abs_diff": float(np.nan_to_num(np.abs(reference - got), nan=np.inf).max()),
    }


def _shown(value: float, bound: float) -> str:
    """``value`` with the decimals (4 at least) that keep it apart from ``bound`` and from a perfect 1 (a
    cosine of 0.99995 is not shown as 1.0000, nor 0.99895 as 0.9990 beside a bound of 0.999)."""
    for decimals in range(4, 10):
        text = f"{value:.{decimals}f}"
        if all(
            (float(text) < mark) == (value < mark) and (float(text) == mark) == (value == mark)
            for mark in (bound, 1.0)
        ):
            return text
    return repr(value)


def cosine_verdict(name: str, entry: dict) -> str:
    """The embedding check of variant ``name`` in plain words: the figure that decides it (the lowest cosine
    similarity to the fp32 embedding over the check windows), its bound, and the mean beside it."""
    bound, worst, mean = entry["threshold"], entry["cosine_min"], entry["cosine_mean"]
    windows = len(entry.get("check_records") or []) or "the"
    if worst >= bound:
        return (
            f"{name}: lowest cosine to the fp32 embedding over {windows} check windows "
            f"{_shown(worst, bound)}, at least the required {bound} (mean {_shown(mean, bound)})"
        )
    return (
        f"{name}: lowest cosine to the fp32 embedding over {windows} check windows {_shown(worst, bound)}, "
        f"below the required {bound} for every window (mean {_shown(mean, bound)})"
    )


def probabilities_verdict(name: str, entry: dict, tolerance: float, windows: int) -> str:
    """The diagnosis check of variant ``name`` in plain words: the largest difference of its probabilities
    from fp32's over ``windows`` check windows against ``tolerance`` (its embedding check beside it)."""
    diff = entry["probabilities_max_abs_diff"]
    verb = "within the allowed" if diff <= tolerance else "above the allowed"
    text = f"{name}: probabilities differ from fp32 by up to {diff:.4f} on {windows} check windows, {verb} "
    text += f"{tolerance}"
    if "cosine_min" in entry:
        text += f" (its embedding passed: lowest cosine {_shown(entry['cosine_min'], entry['threshold'])})"
    return text


def variant_verdict(name: str, entry: dict) -> str:
    """Why variant ``name`` does or does not serve, in plain words (``entry``: its ``variants`` value)."""
    if entry.get("reason"):
        return entry["reason"] if entry["reason"].startswith(f"{name}:") else f"{name}: {entry['reason']}"
    if entry.get("error"):
        return f"{name}: could not be made: {entry['error']}"
    if "cosine_min" in entry and "threshold" in entry:
        return cosine_verdict(name, entry)
    return f"{name}: {entry.get('status', 'unknown status')}"


def quantise_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights, uint8 activations quantised per run.

    Weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2 only, e.g. AMD Zen 3) the
    u8 x s8 kernels saturate their 16-bit intermediate sums with full-range weights (a random-init ST-MEM
    tiny: cosine to fp32 0.988 at 8 bits, 0.99998 at 7); with VNNI the seventh bit costs nothing measurable.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_suffix(".tmp")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, reduce_range=True)
    tmp.replace(dst)


def convert_fp16(src: Path, dst: Path) -> None:
    """Half-precision weights and activations; the graph's inputs and outputs stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    tmp = dst.with_suffix(".tmp")
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(tmp))
    tmp.replace(dst)


def _run(path: Path, windows: np.ndarray, providers: list[str]) -> tuple[np.ndarray, str]:
    session = ort.InferenceSession(str(path), providers=providers)
    return session.run([OUTPUT_NAME], {INPUT_NAME: windows})[0], session.get_providers()[0]


def make_variants(
    onnx_path: Path,
    spec: InputSpec,
    *,
    sha256: str | None = None,
    which: list[str] | None = None,
    data_root: Path | None = None,
) -> dict:
    """Make and check the variants of the fp32 file ``onnx_path``; never raises for a variant's failure
    (it is stored with status ``error`` and the reason). Returns the ``model_versions.variants`` value."""
    onnx_path = Path(onnx_path)
    variants: dict = {
        "fp32": {
            "file": str(onnx_path),
            "sha256": sha256 or sha256_file(onnx_path),
            "bytes": onnx_path.stat().st_size,
            "status": "reference",
        }
    }
    which = variants_to_make() if which is None else which
    if not which:
        return variants
    windows, records = check_windows(spec, data_root)
    reference = None
    if windows is not None:
        reference, _ = _run(onnx_path, windows, ["CPUExecutionProvider"])
    makers = {"int8": (quantise_int8, ["CPUExecutionProvider"]), "fp16": (convert_fp16, None)}
    for name in which:
        make, providers = makers[name]
        if providers is None:  # fp16: checked on CUDA where there is one
            providers = [CUDA, "CPUExecutionProvider"] if CUDA in ort.get_available_providers() else None
            providers = providers or ["CPUExecutionProvider"]
        path = variant_path(onnx_path, name)
        started = time.perf_counter()
        entry: dict = {"file": str(path), "threshold": MIN_COSINE}
        try:
            make(onnx_path, path)
            entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
            if reference is None:
                entry.update(
                    status="unchecked",
                    reason="no PTB-XL record under the data root to check it on: not served automatically",
                )
            else:
                got, provider = _run(path, windows, providers)
                entry.update(compare(reference, got), checked_on=provider, check_records=records)
                entry["status"] = "passed" if entry["cosine_min"] >= MIN_COSINE else "failed"
                if entry["status"] == "failed":
                    entry["reason"] = cosine_verdict(name, entry)
        except Exception as exc:  # a variant is an optimisation: its failure never fails the registration
            log.warning("the %s variant of %s could not be made: %s", name, onnx_path, exc)
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        entry["seconds"] = round(time.perf_counter() - started, 2)
        log.info("variant of %s %s: %s", onnx_path, entry["status"], variant_verdict(name, entry))
        variants[name] = entry
    return variants


def check_head_variants(variants: dict, onnx_path: Path, windows: np.ndarray) -> None:
    """The int8 / fp16 variants of a diagnosis model are checked on its embedding (cosine, at registration)
    and here on its probabilities: a variant whose probabilities differ from fp32 by more than
    ``PROBABILITY_TOLERANCE`` on the check windows is marked failed (then fp32 serves, with the reason).

    (Measured: an int8 linear-probe model kept cosine 0.99997 to fp32 yet moved probabilities by up to
    0.025, enough to cross a threshold.)"""
    fp32 = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = fp32.run([PROBABILITIES_NAME], {INPUT_NAME: windows})[0]
    for name, entry in variants.items():
        if name == "fp32" or entry.get("status") != "passed":
            continue
        providers = [CUDA, "CPUExecutionProvider"] if name == "fp16" else ["CPUExecutionProvider"]
        available = [p for p in providers if p in ort.get_available_providers()]
        got = ort.InferenceSession(entry["file"], providers=available).run(
            [PROBABILITIES_NAME], {INPUT_NAME: windows}
        )[0]
        diff = float(np.abs(got - reference).max())
        entry["probabilities_max_abs_diff"] = diff
        if not diff <= PROBABILITY_TOLERANCE:
            entry["status"] = "failed"
            entry["reason"] = probabilities_verdict(name, entry, PROBABILITY_TOLERANCE, len(windows))
