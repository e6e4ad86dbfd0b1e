"""The one preprocessing path for training, evaluation and serving.

recording --select/derive leads--> (C, T) mV --resample (polyphase)--> (C, T') at the model rate
--band-pass (Butterworth, zero-phase)--> filtered signal  [``prepare_signal``]
--windows (sliding / centre / random crop / 3 test-time crops)--> (n, C, W) --standardise each--> model input

Evaluation and ``/predict`` see a record as the cache stores it: non-overlapping 10-s segments
(``split_segments``; the remainder is dropped), each read through ST-MEM's 3 test-time crops
(``segment_crops``, methods.md 1.4); ``preprocess(..., windowing="three_crop")`` gives those windows.
"""

from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import signal as sps

from services.ecg.leads import STANDARD_LEADS, select_leads
from services.ecg.recording import Recording
from services.errors import EcgInputError

Windowing = Literal["sliding", "center", "three_crop"]


@dataclass(frozen=True)
class Reading:
    """How a served or exported record is read into a model's windows: the windowing, zero-padding of a
    record shorter than one window, and NaN/inf gaps filled by linear interpolation instead of refused."""

    windowing: Windowing = "sliding"
    pad: bool = False
    interpolate_nan: bool = False


SEGMENT_S = 10.0  # ST-MEM's segments: the cache cuts records into these, evaluation reads each by 3 crops


@dataclass(frozen=True)
class InputSpec:
    """What a model consumes; stored with every model version."""

    leads: tuple[str, ...] = STANDARD_LEADS
    fs: float = 250.0
    samples: int = 2250  # window length fed to the model
    highpass_hz: float = 0.67
    lowpass_hz: float = 40.0
    filter_order: int = 5

    def to_dict(self) -> dict:
        return {**asdict(self), "leads": list(self.leads)}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(**{**data, "leads": tuple(data["leads"])})


@lru_cache(maxsize=16)
def _bandpass_sos(fs: float, highpass_hz: float, lowpass_hz: float, order: int) -> np.ndarray:
    # High-pass then low-pass (ST-MEM's two order-5 filters), as one cascade of second-order sections.
    high = sps.butter(order, highpass_hz, btype="highpass", fs=fs, output="sos")
    low = sps.butter(order, lowpass_hz, btype="lowpass", fs=fs, output="sos")
    return np.concatenate([high, low])


def resample(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis (anti-aliased).

    ``padtype="line"``: the edges are extended along the signal's trend, not with zeros, so a baseline
    offset does not turn into a step (and a filter transient) at both ends.
    """
    if fs_in == fs_out:
        return signal
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return sps.resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1, padtype="line")


def resampled_length(samples: int, fs_in: float, fs_out: float) -> int:
    """The samples ``resample`` gives for ``samples`` at ``fs_in`` (scipy's ``resample_poly`` length, at the
    same rational approximation of the ratio), without resampling anything."""
    if fs_in == fs_out:
        return samples
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return -(-samples * ratio.numerator // ratio.denominator)


FLAT_STD_MV = 1e-3  # a lead whose standard deviation is below 1 µV carries no ECG


def interpolate_gaps(x: np.ndarray) -> np.ndarray:
    """Each row with its NaN/inf samples replaced by linear interpolation between the nearest finite ones.

    A gap at either end takes the nearest finite value. Rows without a finite sample stay as they are
    (``check_signal`` refuses them).
    """
    out = np.array(x, dtype=np.float64, copy=True)
    index = np.arange(out.shape[-1])
    for row in out:
        bad = ~np.isfinite(row)
        if bad.any() and not bad.all():
            row[bad] = np.interp(index[bad], index[~bad], row[~bad])
    return out.astype(x.dtype, copy=False)


def check_signal(
    x: np.ndarray,
    lead_names: list[str] | tuple[str, ...],
    source: str,
    *,
    interpolate_nan: bool = False,
    reject_flat: bool = False,
) -> np.ndarray:
    """Refuse what cannot be embedded: (leads, samples) in mV, checked and possibly repaired.

    - no samples: error;
    - NaN/inf samples: an error naming the leads, unless ``interpolate_nan`` (linear interpolation over
      each gap); a lead without any finite sample is an error either way;
    - ``reject_flat``: error when *every* lead is a flat line (std below ``FLAT_STD_MV`` = 1 µV), i.e.
      nothing was recorded (or the values are in V, not mV). One or a few flat leads are accepted: a
      disconnected electrode happens in real recordings and the other leads still carry the ECG.
    """
    if x.ndim != 2 or x.shape[1] == 0:
        raise EcgInputError(f"{source}: the signal has no samples")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.nonzero(bad.any(axis=1))[0]
        leads = ", ".join(sorted({lead_names[i] for i in rows}))
        if not interpolate_nan:
            raise EcgInputError(
                f"{source}: {int(bad.sum())} NaN or infinite sample(s) (interpolate_nan=true fills such gaps "
                f"linearly) in lead(s) {leads}"
            )
        dead = sorted({lead_names[i] for i in np.nonzero(bad.all(axis=1))[0]})
        if dead:
            raise EcgInputError(
                f"{source}: lead(s) {', '.join(dead)} hold no finite sample at all: "
                "nothing to interpolate from"
            )
        x = interpolate_gaps(x)
    if reject_flat:
        std = x.astype(np.float64).std(axis=1)
        if (std < FLAT_STD_MV).all():
            raise EcgInputError(
                f"{source}: flat line: every lead ({', '.join(lead_names)}) is constant (std below 1 µV); "
                "nothing was recorded, or the values are not in mV"
            )
    return x


def model_recording(
    recording: Recording, spec: InputSpec, *, interpolate_nan: bool = False, reject_flat: bool = False
) -> Recording:
    """The recording reduced to the model's leads (``spec.leads`` order, limb leads derived) and checked.

    ``prepare_signal`` of the result equals ``prepare_signal`` of ``recording`` with the same options; a
    caller whose path reaches ``preprocess`` without these options can apply them here first.
    """
    x = select_leads(recording.signal, recording.lead_names, spec.leads)
    x = check_signal(
        x, spec.leads, recording.source, interpolate_nan=interpolate_nan, reject_flat=reject_flat
    )
    return Recording(
        signal=x.astype(np.float32, copy=False),
        fs=recording.fs,
        lead_names=list(spec.leads),
        source=recording.source,
        comments=list(recording.comments),
    )


def prepare_signal(
    recording: Recording, spec: InputSpec, *, interpolate_nan: bool = False, reject_flat: bool = False
) -> np.ndarray:
    """Leads in the model's order, at the model's rate, band-passed: (len(spec.leads), T') float32.

    ``interpolate_nan`` and ``reject_flat``: see ``check_signal`` (both off by default, as in training).
    """
    x = model_recording(recording, spec, interpolate_nan=interpolate_nan, reject_flat=reject_flat).signal
    x = resample(x.astype(np.float64), recording.fs, spec.fs)
    min_len = 3 * 2 * (2 * spec.filter_order)  # sosfiltfilt's default padding needs this many samples
    if x.shape[1] <= min_len:
        raise EcgInputError(
            f"{recording.source}: {recording.duration_s:.2f} s is too short to band-pass; the model's window "
            f"is {spec.samples / spec.fs:.1f} s (shorter records need pad=true and at least "
            f"{(min_len + 1) / spec.fs:.2f} s)"
        )
    sos = _bandpass_sos(spec.fs, spec.highpass_hz, spec.lowpass_hz, spec.filter_order)
    return sps.sosfiltfilt(sos, x, axis=-1).astype(np.float32)


def standardise(windows: np.ndarray) -> np.ndarray:
    """Per window, one mean and std over leads and time (keeps inter-lead ratios); flat -> zeros."""
    mean = windows.mean(axis=(-2, -1), keepdims=True)
    std = windows.std(axis=(-2, -1), keepdims=True)
    return np.where(std > 1e-8, (windows - mean) / np.maximum(std, 1e-8), 0.0).astype(np.float32)


def window_starts(length: int, window: int, windowing: Windowing) -> list[int]:
    """Start indices: ``center`` one centred crop; ``sliding`` evenly spaced windows covering the record."""
    if windowing == "center":
        return [(length - window) // 2]
    n = int(np.ceil((length - window) / window)) + 1
    return sorted({int(round(s)) for s in np.linspace(0, length - window, n)})


def three_crop_starts(length: int, window: int) -> list[int]:
    """ST-MEM's test-time crops (methods.md 1.4): 3 starts spaced by (length - window) // 2, e.g.
    0, 125, 250 for 2500 samples and a 2250-sample window; one start (0) when the window fills the signal."""
    if length < window:
        raise ValueError(f"signal of {length} samples is shorter than the {window}-sample window")
    step = (length - window) // 2
    return [0] if step == 0 else [0, step, 2 * step]


def segment_crops(segment: np.ndarray, window: int, centre_only: bool = False) -> np.ndarray:
    """The 3 test-time crops of one segment (C, T) (``three_crop_starts``), each standardised: (3, C, window)
    (1 when the window fills the segment); ``centre_only``: the middle one alone (1, C, window)."""
    starts = three_crop_starts(segment.shape[-1], window)
    starts = starts[len(starts) // 2 :][:1] if centre_only else starts
    return standardise(np.stack([segment[:, s : s + window] for s in starts]))


def split_segments(x: np.ndarray, segment: int) -> np.ndarray:
    """(C, T) -> (T // segment, C, segment): consecutive non-overlapping segments, the remainder dropped."""
    count = x.shape[-1] // segment
    return np.ascontiguousarray(x[:, : count * segment].reshape(x.shape[0], count, segment).swapaxes(0, 1))


def window_count(samples: int, fs: float, spec: InputSpec, windowing: Windowing) -> int:
    """The windows ``preprocess`` cuts from a record of ``samples`` samples at ``fs`` Hz, from its length
    alone (before it is read); 1 for a record shorter than the window (padded, or refused without pad)."""
    length = resampled_length(samples, fs, spec.fs)
    if length < spec.samples or windowing == "center":
        return 1
    if windowing == "three_crop":
        segment = max(int(round(SEGMENT_S * spec.fs)), spec.samples)
        if length < segment:
            return len(three_crop_starts(length, spec.samples))
        return (length // segment) * len(three_crop_starts(segment, spec.samples))
    return -(-(length - spec.samples) // spec.samples) + 1  # window_starts' count: no two starts coincide


def preprocess(
    recording: Recording,
    spec: InputSpec,
    windowing: Windowing = "sliding",
    pad: bool = False,
    *,
    interpolate_nan: bool = False,
    reject_flat: bool = False,
) -> np.ndarray:
    """Model-ready windows (n_windows, leads, spec.samples) for one recording.

    ``three_crop``: as evaluation reads the cache, the 3 test-time crops of each 10-s segment, segment after
    segment ((3 * segments, C, W); their mean is the mean over segments of the 3-crop means). A record
    shorter than 10 s (the cache skips those) is one segment of its own length; shorter than the window,
    it needs ``pad`` and gives one window."""
    x = prepare_signal(recording, spec, interpolate_nan=interpolate_nan, reject_flat=reject_flat)
    if x.shape[1] < spec.samples:
        if not pad:
            raise EcgInputError(
                f"{recording.source}: {recording.duration_s:.2f} s is shorter than the model's window of "
                f"{spec.samples / spec.fs:.2f} s ({spec.samples} samples at {spec.fs:g} Hz); "
                "pass pad=true to zero-pad"
            )
        x = np.pad(x, ((0, 0), (0, spec.samples - x.shape[1])))
    if windowing == "three_crop":
        segment = max(int(round(SEGMENT_S * spec.fs)), spec.samples)
        segments = split_segments(x, segment) if x.shape[1] >= segment else x[None]
        return np.concatenate([segment_crops(seg, spec.samples) for seg in segments])
    starts = window_starts(x.shape[1], spec.samples, windowing)
    windows = np.stack([x[:, s : s + spec.samples] for s in starts])
    return standardise(windows)
