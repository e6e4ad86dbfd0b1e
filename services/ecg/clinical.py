"""Clinical measurements per record (NeuroKit2, at the record's own sampling rate) and their normaliser.

For the "hybrid input" models (methods.md §3.4 and §6.2): ``clinical_features(recording)`` gives one
vector of ``CLINICAL_FEATURES`` per record (heart rate, RR variability, PR / QRS / QT / QTc, ST deviation,
QRS axis), NaN where a value cannot be measured; ``FeatureNormaliser``, fitted on the training split, turns
them into finite, standardised values plus one missing indicator per feature (late fusion, or one token per
feature). ``clinical_features_for`` computes them for a dataset, cached on disk.

Every measurement is taken at the rate the samples were recorded at: NeuroKit2 gets ``recording.fs`` and
every window is given in seconds, so the 100 Hz and 500 Hz versions of one record agree.

Beats are found with NeuroKit2 (``ecg_clean`` + ``ecg_peaks``) on lead II and accepted only when they look
like one repeated waveform (``beat_consistency``): pure noise, a flat line or a record with fewer than
``MIN_BEATS`` beats gives all-NaN features instead of numbers measured on noise.

Waves: P onset and T offset come from NeuroKit2's ``prominence`` delineation of lead II (Emrich et al.
2023). QRS onset and offset are global, from the spatial velocity of the 8 independent leads (I, II,
V1-V6; ``QRS_LEADS``), where it falls below ``QRS_VELOCITY_FRACTION`` of its rise: NeuroKit2's own QRS bounds
misplace the onset or stop at the base of the R wave (the measurements are in ``reports/design_notes.md``).
A record with fewer than 3 of those leads falls back to NeuroKit2's ``prominence`` QRS bounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import neurokit2 as nk
import numpy as np
from scipy.ndimage import uniform_filter1d

from services.ecg.leads import select_leads
from services.ecg.preprocess import FLAT_STD_MV, interpolate_gaps
from services.ecg.recording import Recording
from services.errors import DatasetError, EcgInputError

CLINICAL_FEATURES: tuple[str, ...] = (
    "heart_rate_bpm",  # mean of NeuroKit2's per-beat rate (60 / RR)
    "rr_sdnn_ms",  # SDNN of the RR intervals (NeuroKit2 hrv_time)
    "rr_rmssd_ms",  # RMSSD of the RR intervals (NeuroKit2 hrv_time)
    "pr_ms",  # P onset -> QRS onset, lead II, median over beats
    "qrs_ms",  # QRS onset -> QRS offset, global (spatial velocity of all leads)
    "qt_ms",  # QRS onset -> T offset (lead II)
    "qtc_ms",  # Bazett: QT / sqrt(mean RR in s)
    "st_ii_mv",  # ST deviation at J+60 ms against the PR segment, lead II
    "st_v2_mv",  # the same in V2 (anterior)
    "st_v5_mv",  # the same in V5 (lateral)
    "qrs_axis_deg",  # frontal QRS axis from the net QRS areas in I and aVF, degrees in (-180, 180]
)
CLINICAL_FORMAT = 1  # bump when a feature's definition changes: cached .npy files are keyed by it

MIN_BEATS = 4  # at least 3 RR intervals
RR_RANGE_S = (0.25, 2.5)  # 24-240 bpm: RR intervals outside are not a heart's rhythm
# Beat consistency: median correlation of each beat with the median beat, over R +- 0.1 s and R +- 0.25 s.
# On the 500 PTB-XL records (lead II) the 0.5 % quantiles are 0.936 and 0.822; on band-limited, white,
# Brownian and heavy-tailed noise at 100-1000 Hz (100 draws) none passed both thresholds. 5 of the 500
# records are rejected (all-NaN): 2 paced (NeuroKit2 finds 3 beats), 3 with ectopy, tachyarrhythmia, IVCD.
CONSISTENCY_MIN = (0.90, 0.85)
# Per-beat plausibility (ms): a delineation outside these bounds is a wave not found, not a measurement.
_INTERVAL_BOUNDS_MS = {"pr": (60.0, 400.0), "qrs": (40.0, 250.0), "qt": (200.0, 700.0)}
# Global QRS bounds: where the spatial velocity of these leads falls below floor + fraction * (peak - floor).
QRS_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
QRS_VELOCITY_FRACTION = 0.1

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Beats


@dataclass
class Beats:
    """R peaks (sample indices) of one lead and whether they passed the consistency check."""

    clean: np.ndarray  # NeuroKit2-cleaned lead
    peaks: np.ndarray  # int sample indices
    fs: float
    accepted: bool

    @property
    def rr_s(self) -> np.ndarray:
        return np.diff(self.peaks) / self.fs


def beat_consistency(clean: np.ndarray, peaks: np.ndarray, fs: float, half_width_s: float) -> float:
    """Median Pearson correlation of each beat (R +- ``half_width_s``) with the median beat; NaN if < 3."""
    half = int(round(half_width_s * fs))
    peaks = peaks[(peaks >= half) & (peaks < len(clean) - half)]
    if len(peaks) < 3:
        return math.nan
    beats = np.stack([clean[p - half : p + half + 1] for p in peaks])
    template = np.median(beats, axis=0)
    beats = beats - beats.mean(axis=1, keepdims=True)
    template = template - template.mean()
    norms = np.linalg.norm(beats, axis=1) * np.linalg.norm(template)
    if not np.all(norms > 0):
        return math.nan
    return float(np.median(beats @ template / norms))


def find_beats(lead: np.ndarray, fs: float) -> Beats:
    """NeuroKit2 R peaks of one lead (mV) at its true rate ``fs``, with the consistency verdict."""
    x = np.asarray(lead, dtype=np.float64)
    empty = Beats(clean=x, peaks=np.zeros(0, dtype=np.int64), fs=fs, accepted=False)
    if x.size < 2 * fs or not np.isfinite(x).any():
        return empty
    x = interpolate_gaps(x[None])[0]
    if x.std() < FLAT_STD_MV:
        return empty
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clean = np.asarray(nk.ecg_clean(x, sampling_rate=fs), dtype=np.float64)
            _, info = nk.ecg_peaks(clean, sampling_rate=fs)
        peaks = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
    except Exception:  # NeuroKit2 raises assorted errors on degenerate input
        return empty
    rr = np.diff(peaks) / fs
    accepted = (
        len(peaks) >= MIN_BEATS
        and bool(np.all((rr >= RR_RANGE_S[0]) & (rr <= RR_RANGE_S[1])))
        and all(
            beat_consistency(clean, peaks, fs, w) >= t
            for w, t in zip((0.1, 0.25), CONSISTENCY_MIN, strict=True)
        )
    )
    return Beats(clean=clean, peaks=peaks, fs=fs, accepted=accepted)


def rhythm(beats: Beats) -> tuple[float, float, float]:
    """(heart rate bpm, SDNN ms, RMSSD ms) from NeuroKit2; NaN when the beats were not accepted."""
    if not beats.accepted:
        return math.nan, math.nan, math.nan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rate = nk.signal_rate(beats.peaks, sampling_rate=beats.fs)
            hrv = nk.hrv_time(beats.peaks, sampling_rate=beats.fs)
        return float(np.mean(rate)), float(hrv["HRV_SDNN"].iloc[0]), float(hrv["HRV_RMSSD"].iloc[0])
    except Exception:
        return math.nan, math.nan, math.nan


# --------------------------------------------------------------------------------------------------
# Clinical features


def _lead(recording: Recording, name: str) -> np.ndarray | None:
    """One lead in mV (limb leads derived from I and II when absent); None when the record lacks it."""
    try:
        x = select_leads(recording.signal, recording.lead_names, (name,))[0].astype(np.float64)
    except EcgInputError:
        return None
    if not np.isfinite(x).any():
        return None
    return interpolate_gaps(x[None])[0]


def _delineate(beats: Beats) -> dict[str, np.ndarray]:
    """NeuroKit2 ``prominence`` delineation: wave name -> float sample index per beat (NaN = not found).

    A wave NeuroKit2 returns with fewer or more values than there are beats (it drops a P onset that would
    fall before the record's start, shifting the rest) cannot be matched to its beats: it is not found."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, waves = nk.ecg_delineate(beats.clean, beats.peaks, sampling_rate=beats.fs, method="prominence")
    beat_count = len(beats.peaks)
    return {
        key.removeprefix("ECG_"): (
            np.asarray(value, dtype=np.float64) if len(value) == beat_count else np.full(beat_count, np.nan)
        )
        for key, value in waves.items()
    }


def _qrs_bounds(recording: Recording, beats: Beats) -> tuple[np.ndarray, np.ndarray] | None:
    """Global QRS onset and offset per beat (float sample indices, NaN = not found) from the spatial
    velocity of ``QRS_LEADS``; None when fewer than 3 of them are in the record.

    Per beat: the velocity peak within R +- 80 ms; onset = last sample before it (up to 150 ms) and offset
    = first sample after it (up to 200 ms) where the velocity is below floor + ``QRS_VELOCITY_FRACTION`` *
    (peak - floor), floor = the record's median velocity. A velocity, not an amplitude: ST elevation does
    not stretch the QRS.
    """
    leads = [x for name in QRS_LEADS if (x := _lead(recording, name)) is not None]
    if len(leads) < 3:
        return None
    fs = beats.fs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = np.stack([np.asarray(nk.ecg_clean(x, sampling_rate=fs), dtype=np.float64) for x in leads])
    velocity = np.sqrt(((np.gradient(clean, axis=1) * fs) ** 2).sum(axis=0))
    velocity = uniform_filter1d(velocity, size=max(1, int(round(0.01 * fs))))
    floor = float(np.median(velocity))
    near, back, ahead = (int(round(s * fs)) for s in (0.08, 0.15, 0.2))
    onsets, offsets = np.full(len(beats.peaks), np.nan), np.full(len(beats.peaks), np.nan)
    for k, r in enumerate(beats.peaks):
        lo, hi = max(0, r - near), min(len(velocity), r + near + 1)
        if hi <= lo:
            continue
        peak = lo + int(np.argmax(velocity[lo:hi]))
        threshold = floor + QRS_VELOCITY_FRACTION * (velocity[peak] - floor)
        before = np.nonzero(velocity[max(0, peak - back) : peak] < threshold)[0]
        if before.size:
            onsets[k] = max(0, peak - back) + before[-1]
        after = np.nonzero(velocity[peak : peak + ahead] < threshold)[0]
        if after.size:
            offsets[k] = peak + after[0]
    return onsets, offsets


def _interval_ms(waves: dict[str, np.ndarray], start: str, end: str, fs: float, kind: str) -> float:
    values = (waves[end] - waves[start]) / fs * 1000.0
    low, high = _INTERVAL_BOUNDS_MS[kind]
    values = values[np.isfinite(values) & (values >= low) & (values <= high)]
    return float(np.median(values)) if values.size else math.nan


def _window_mean(x: np.ndarray, centre: float, half: int) -> float:
    lo, hi = int(round(centre)) - half, int(round(centre)) + half + 1
    if lo < 0 or hi > len(x):
        return math.nan
    return float(x[lo:hi].mean())


def _st_deviation(x: np.ndarray | None, waves: dict[str, np.ndarray], fs: float) -> float:
    """Median over beats of mean(x at J+60 ms +- 10 ms) - mean(x over the 20 ms before QRS onset), mV."""
    if x is None:
        return math.nan
    half = max(1, int(round(0.01 * fs)))
    values = []
    for onset, j_point in zip(waves["R_Onsets"], waves["R_Offsets"], strict=True):
        if not (np.isfinite(onset) and np.isfinite(j_point)):
            continue
        baseline = _window_mean(x, onset - half - 1, half)
        st = _window_mean(x, j_point + 0.06 * fs, half)
        if np.isfinite(baseline) and np.isfinite(st):
            values.append(st - baseline)
    return float(np.median(values)) if values else math.nan


def _net_qrs_area(x: np.ndarray, waves: dict[str, np.ndarray], fs: float) -> float:
    """Median over beats of the QRS area (mV*s) above the pre-QRS baseline."""
    half = max(1, int(round(0.01 * fs)))
    areas = []
    for onset, offset in zip(waves["R_Onsets"], waves["R_Offsets"], strict=True):
        if not (np.isfinite(onset) and np.isfinite(offset)) or offset <= onset:
            continue
        lo, hi = int(onset), int(offset) + 1
        baseline = _window_mean(x, onset - half - 1, half)
        if hi > len(x) or not np.isfinite(baseline):
            continue
        areas.append(float(np.sum(x[lo:hi] - baseline)) / fs)
    return float(np.median(areas)) if areas else math.nan


def _qrs_axis(lead_i: np.ndarray | None, lead_avf: np.ndarray | None, waves: dict, fs: float) -> float:
    if lead_i is None or lead_avf is None:
        return math.nan
    area_i, area_avf = _net_qrs_area(lead_i, waves, fs), _net_qrs_area(lead_avf, waves, fs)
    if not (np.isfinite(area_i) and np.isfinite(area_avf)) or (area_i == 0 and area_avf == 0):
        return math.nan
    return float(np.degrees(np.arctan2(area_avf, area_i)))


def clinical_features(recording: Recording) -> np.ndarray:
    """``CLINICAL_FEATURES`` of one record, float64, NaN where a value cannot be measured. Never raises on
    a flat, noisy or short signal.

    Beats, P onsets and T offsets come from lead II (derived from the other limb leads when needed; the
    first channel when the record has no limb leads at all), QRS bounds from all leads (``_qrs_bounds``),
    all at ``recording.fs``. ST deviations use the unfiltered lead (mV) at J + 60 ms against the 20 ms
    before QRS onset, so a 0.5 Hz high-pass cannot bend them; the axis uses the net QRS areas in I and aVF.
    """
    out = np.full(len(CLINICAL_FEATURES), np.nan)
    fs = float(recording.fs)
    lead_ii = _lead(recording, "II")
    if lead_ii is None and recording.signal.shape[0] > 0 and np.isfinite(recording.signal[0]).any():
        lead_ii = interpolate_gaps(recording.signal[:1].astype(np.float64))[0]
    if lead_ii is None:
        return out
    beats = find_beats(lead_ii, fs)
    if not beats.accepted:
        return out
    out[0:3] = rhythm(beats)
    try:
        waves = _delineate(beats)
        bounds = _qrs_bounds(recording, beats)
    except Exception:  # NeuroKit2 failed on this record: the rhythm values stand, the waves are missing
        return out
    if bounds is not None:
        waves["R_Onsets"], waves["R_Offsets"] = bounds
    pr = _interval_ms(waves, "P_Onsets", "R_Onsets", fs, "pr")
    qrs = _interval_ms(waves, "R_Onsets", "R_Offsets", fs, "qrs")
    qt = _interval_ms(waves, "R_Onsets", "T_Offsets", fs, "qt")
    qtc = qt / math.sqrt(float(np.mean(beats.rr_s))) if np.isfinite(qt) else math.nan
    out[3:7] = pr, qrs, qt, qtc
    out[7] = _st_deviation(lead_ii, waves, fs)
    out[8] = _st_deviation(_lead(recording, "V2"), waves, fs)
    out[9] = _st_deviation(_lead(recording, "V5"), waves, fs)
    out[10] = _qrs_axis(_lead(recording, "I"), _lead(recording, "aVF"), waves, fs)
    return out


def _dataset_identity(dataset: object) -> dict:
    """What a feature cache of ``dataset`` is keyed by when the caller gives no identity."""
    path = next(
        (getattr(dataset, a) for a in ("root", "file", "path") if getattr(dataset, a, None) is not None), None
    )
    identity: dict = {"kind": getattr(dataset, "kind", type(dataset).__name__), "records": len(dataset)}
    if path is not None:
        path = Path(path)
        identity["path"] = str(path.resolve())
        identity["mtime_ns"] = path.stat().st_mtime_ns if path.exists() else None
    for option in ("sampling_rate", "seed"):
        if getattr(dataset, option, None) is not None:
            identity[option] = getattr(dataset, option)
    return identity


def clinical_cache_key(dataset: object, indices: np.ndarray, identity: dict | None = None) -> str:
    """Cache key: feature definition, NeuroKit2 version, dataset identity and the record ids asked for."""
    ids = "\n".join(str(dataset.record_id(int(i))) for i in indices)  # type: ignore[attr-defined]
    payload = json.dumps(
        {
            "format": CLINICAL_FORMAT,
            "features": CLINICAL_FEATURES,
            "neurokit2": nk.__version__,
            "dataset": identity if identity is not None else _dataset_identity(dataset),
            "records_sha": hashlib.sha256(ids.encode()).hexdigest()[:16],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def clinical_features_for(
    dataset: object,
    indices: Sequence[int] | np.ndarray,
    cache_dir: Path | None = None,
    on_progress: ProgressFn | None = None,
    identity: dict | None = None,
) -> np.ndarray:
    """(len(indices), len(CLINICAL_FEATURES)) features of ``dataset`` records, rows in ``indices`` order.

    With ``cache_dir`` the array is stored as ``clinical-<key>.npy`` (written atomically) and read back on
    the next call; ``identity`` (as for the preprocessed cache) overrides the identity derived from the
    dataset's kind, path, mtime and options. A record that cannot be read gives a NaN row.
    """
    indices = np.asarray(indices, dtype=np.int64)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"clinical-{clinical_cache_key(dataset, indices, identity)}.npy"
        if path.is_file():
            return np.load(path)
    rows = np.full((len(indices), len(CLINICAL_FEATURES)), np.nan)
    for done, i in enumerate(indices.tolist(), start=1):
        with contextlib.suppress(EcgInputError, DatasetError):  # unreadable record: its row stays NaN
            rows[done - 1] = clinical_features(dataset.recording(i))  # type: ignore[attr-defined]
        if on_progress is not None and (done % 25 == 0 or done == len(indices)):
            on_progress(done, len(indices))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npy", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, rows)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return rows


# --------------------------------------------------------------------------------------------------
# Normaliser


@dataclass
class FeatureNormaliser:
    """Standardisation fitted on training rows only; missing values imputed, with indicators kept.

    transform: optional log1p (skewed, non-negative features) -> (x - mean) / scale -> NaN replaced by the
    standardised training median (or 0 = the mean) -> clipped to +-``clip``. Returned with a 0/1 missing
    indicator per feature.
    """

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    fill: np.ndarray  # imputed value, already standardised
    log: tuple[str, ...] = ()
    clip: float = 5.0

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        rows: Sequence[int] | np.ndarray | None = None,
        names: Sequence[str] = CLINICAL_FEATURES,
        log: Sequence[str] = ("rr_sdnn_ms", "rr_rmssd_ms"),
        impute: str = "median",
        clip: float = 5.0,
    ) -> FeatureNormaliser:
        """Fit on ``features[rows]`` (the training split; all rows when None). NaN = missing."""
        x = np.asarray(features, dtype=np.float64)
        if rows is not None:
            x = x[np.asarray(rows, dtype=np.int64)]
        names = tuple(names)
        if x.ndim != 2 or x.shape[1] != len(names):
            raise ValueError(f"expected (rows, {len(names)}) features, got {x.shape}")
        if impute not in ("median", "mean"):
            raise ValueError(f"impute must be 'median' or 'mean', not {impute!r}")
        log = tuple(n for n in log if n in names)
        x = _log1p_columns(x, names, log)
        mean, scale, fill = np.zeros(len(names)), np.ones(len(names)), np.zeros(len(names))
        for j in range(len(names)):
            column = x[np.isfinite(x[:, j]), j]
            if column.size == 0:
                continue
            mean[j] = column.mean()
            std = column.std()
            scale[j] = std if std > 1e-12 else 1.0
            if impute == "median":
                fill[j] = (np.median(column) - mean[j]) / scale[j]
        return cls(names=names, mean=mean, scale=scale, fill=fill, log=log, clip=clip)

    def transform(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, missing): both (rows, features) float32; values finite, missing 1 where imputed."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise ValueError(f"expected (rows, {len(self.names)}) features, got {x.shape}")
        x = _log1p_columns(x, self.names, self.log)
        missing = ~np.isfinite(x)
        z = (x - self.mean) / self.scale
        z = np.where(missing, self.fill, z)
        return np.clip(z, -self.clip, self.clip).astype(np.float32), missing.astype(np.float32)

    def transform_stacked(self, features: np.ndarray) -> np.ndarray:
        """(rows, 2 * features): the values, then the missing indicators (e.g. for late fusion)."""
        values, missing = self.transform(features)
        return np.concatenate([values, missing], axis=1)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "fill": self.fill.tolist(),
            "log": list(self.log),
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureNormaliser:
        return cls(
            names=tuple(data["names"]),
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            fill=np.asarray(data["fill"], dtype=np.float64),
            log=tuple(data.get("log", ())),
            clip=float(data.get("clip", 5.0)),
        )


def _log1p_columns(x: np.ndarray, names: tuple[str, ...], log: tuple[str, ...]) -> np.ndarray:
    if not log:
        return x
    x = x.copy()
    for name in log:
        j = names.index(name)
        with np.errstate(invalid="ignore"):
            x[:, j] = np.log1p(np.maximum(x[:, j], 0.0))
    return x
