"""The one preprocessing path for training, evaluation and serving.

recording --select/derive leads--> (C, T) mV --resample (polyphase)--> (C, T') at the model rate
--band-pass (Butterworth, zero-phase)--> filtered signal  [``prepare_signal``]
--windows (sliding / centre / random crop)--> (n, C, W) --standardise per window--> model input
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

Windowing = Literal["sliding", "center"]


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


def prepare_signal(recording: Recording, spec: InputSpec) -> np.ndarray:
    """Leads in the model's order, at the model's rate, band-passed: (len(spec.leads), T') float32."""
    x = select_leads(recording.signal, recording.lead_names, spec.leads)
    if x.shape[1] == 0:
        raise EcgInputError(f"{recording.source}: the signal has no samples")
    bad = ~np.isfinite(x)
    if bad.any():
        leads = sorted({spec.leads[i] for i in np.nonzero(bad.any(axis=1))[0]})
        raise EcgInputError(
            f"{recording.source}: {int(bad.sum())} NaN or infinite sample(s) in lead(s) {', '.join(leads)}"
        )
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


def preprocess(
    recording: Recording, spec: InputSpec, windowing: Windowing = "sliding", pad: bool = False
) -> np.ndarray:
    """Model-ready windows (n_windows, leads, spec.samples) for one recording."""
    x = prepare_signal(recording, spec)
    if x.shape[1] < spec.samples:
        if not pad:
            raise EcgInputError(
                f"{recording.source}: {recording.duration_s:.2f} s is shorter than the model's window of "
                f"{spec.samples / spec.fs:.2f} s ({spec.samples} samples at {spec.fs:g} Hz); "
                "pass pad=true to zero-pad"
            )
        x = np.pad(x, ((0, 0), (0, spec.samples - x.shape[1])))
    starts = window_starts(x.shape[1], spec.samples, windowing)
    windows = np.stack([x[:, s : s + spec.samples] for s in starts])
    return standardise(windows)
