"""The ``Recording`` every reader returns, the checks every reader applies to one, and the request limits.

A ``Recording`` is one ECG in mV, float32, leads x samples, with its sampling rate and lead names.
``check_fs`` and ``check_array_shape`` (with ``recording_from_array``, which builds a checked one from an
array) are the checks shared by the readers; ``ReadLimits`` bounds what the records of one request may
hold (duration per record, model windows per request) and is asked by the readers before samples are
decoded. This module is the bottom of ``services.ecg``: it imports only ``services.ecg.leads``.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.config import get_settings
from services.ecg.leads import STANDARD_LEADS
from services.errors import EcgInputError, TooLargeError

# Sampling rates accepted from any source. Below 50 Hz nothing of the ECG's band survives (and resampling
# such a record up to the model's rate could take gigabytes); above 100 kHz the rate ratio to the model's
# rate no longer has a usable rational approximation.
MIN_FS_HZ = 50.0


MAX_FS_HZ = 100_000.0


@dataclass
class Recording:
    """One ECG: ``signal`` in mV, float32, shaped (channels, samples)."""

    signal: np.ndarray
    fs: float
    lead_names: list[str]
    source: str
    comments: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.signal.shape[1] / self.fs


class ContentTooLargeError(EcgInputError, TooLargeError):
    """The content of an upload is over one of the service's limits (413): its size (e.g. a .zip once
    expanded), a record's duration, the records or model windows of one request."""


class RecordTooLongError(ContentTooLargeError):
    """One record lasts longer than ``ECGSSL_UPLOAD_MAX_SECONDS``: that record is refused."""


class TooManyWindowsError(ContentTooLargeError):
    """The records of one request together give more model windows than ``ECGSSL_SERVE_MAX_WINDOWS``: the
    request is refused (in a batch as well: the limit is the request's, not one record's)."""


def duration_text(seconds: float) -> str:
    """A duration for messages: '38.4 s', '12.5 min', '10.00 h'."""
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


WindowCounter = Callable[[int, float], int]  # (samples, fs) -> windows the model cuts from such a record


@dataclass
class ReadLimits:
    """What the records of one request may hold, checked by ``admit`` from each record's header or array
    shape, before its samples are decoded: each record at most ``max_seconds`` long, and, where
    ``count_windows`` says how many model windows a record gives, at most ``max_windows`` windows for all
    the request's records together. With the upload size limit this bounds a request's memory: decoding
    is bounded by the bytes, preprocessing by the duration, the model input by the windows."""

    max_seconds: float
    max_windows: int | None = None
    count_windows: WindowCounter | None = None
    windows: int = 0  # windows of the records admitted so far
    admitted: int = 0  # records admitted so far

    @classmethod
    def from_settings(cls, count_windows: WindowCounter | None = None) -> "ReadLimits":
        settings = get_settings()
        return cls(settings.upload_max_seconds, settings.serve_max_windows, count_windows)

    def admit(self, source: str, samples: int, fs: object) -> None:
        """Count one record of ``samples`` samples at ``fs`` Hz, or refuse it (413). A rate the readers
        would refuse (missing, not a number, outside ``MIN_FS_HZ``-``MAX_FS_HZ``) is not counted: the reader
        says what is wrong with it, and ``read_upload`` admits a record it read without admitting it."""
        try:
            rate = float(fs)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if isinstance(fs, bool) or not MIN_FS_HZ <= rate <= MAX_FS_HZ:
            return
        duration = samples / rate
        if duration > self.max_seconds:
            raise RecordTooLongError(
                f"{source}: the record lasts {duration_text(duration)} ({samples} samples at {rate:g} Hz), "
                f"longer than the {duration_text(self.max_seconds)} accepted per record: send a shorter "
                "excerpt, or raise the limit with the setting ECGSSL_UPLOAD_MAX_SECONDS "
                f"(now {self.max_seconds:g} s)"
            )
        windows = self.count_windows(samples, rate) if self.count_windows is not None else 0
        if self.max_windows is not None and self.windows + windows > self.max_windows:
            total = f", {self.windows + windows} with the records before it" if self.admitted else ""
            raise TooManyWindowsError(
                f"{source}: this record gives {windows} model windows ({duration_text(duration)} at "
                f"{rate:g} Hz){total}, over the limit of {self.max_windows} windows per request: send "
                "fewer or shorter records, or raise the limit with the setting ECGSSL_SERVE_MAX_WINDOWS"
            )
        self.windows += windows
        self.admitted += 1


def check_fs(fs: float | None, source: str, hint: str = "") -> float:
    """The sampling rate as a float, or an ``EcgInputError`` saying why it cannot be used."""
    if fs is None:
        raise EcgInputError(f"{source}: the sampling rate is missing{hint}")
    try:
        value = float(fs)
    except (TypeError, ValueError):
        raise EcgInputError(f"{source}: the sampling rate {fs!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise EcgInputError(f"{source}: the sampling rate must be a positive number of Hz, got {fs!r}")
    if not MIN_FS_HZ <= value <= MAX_FS_HZ:
        raise EcgInputError(
            f"{source}: a sampling rate of {value:g} Hz is outside the accepted "
            f"{MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz"
        )
    return value


def check_array_shape(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    """Refuse what is not a numeric 2-D array of leads x samples (from the array or its .npy header)."""
    if len(shape) != 2 or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise EcgInputError(
            f"{source}: expected a numeric 2-D array of leads x samples, got shape {shape} of {dtype}"
        )
    if math.prod(shape) == 0:
        raise EcgInputError(f"{source}: the array holds no samples (shape {shape})")
    if shape[0] > shape[1]:
        raise EcgInputError(
            f"{source}: shape {shape} looks like samples x leads; expected leads x samples (transpose it)"
        )


def recording_from_array(
    array: np.ndarray, fs: float | None, lead_names: list[str] | None, source: str, fs_hint: str = ""
) -> Recording:
    """Check a numeric 2-D array of leads x samples (mV) with its rate and names; return the ``Recording``."""
    check_array_shape(array.shape, array.dtype, source)
    fs = check_fs(fs, source, fs_hint)
    names = lead_names or _default_names(array.shape[0], source)
    if len(names) != array.shape[0]:
        raise EcgInputError(f"{source}: {len(names)} lead names given for {array.shape[0]} rows")
    return Recording(signal=array.astype(np.float32), fs=fs, lead_names=list(names), source=source)


def _default_names(n_rows: int, source: str) -> list[str]:
    if n_rows == 12:
        return list(STANDARD_LEADS)
    raise EcgInputError(
        f"{source}: {n_rows} rows without lead names; send 'leads' (comma-separated names) or 12 rows "
        "in the standard order I, II, III, aVR, aVL, aVF, V1-V6"
    )
