"""Readers that turn an ECG on disk or an upload into one ``Recording``.

This module holds the ``Recording`` type, the WFDB and ``.npy`` readers and ``read_upload``, the one entry
point for uploads; the other formats (EDF/BDF, ``.npz``, CSV, JSON) and ``.zip`` handling live in
``services.ecg.formats``.
"""

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import wfdb
from wfdb.io.header import parse_header_content, rx_record, rx_signal

from services.config import get_settings
from services.ecg.leads import STANDARD_LEADS, canonical_lead_name
from services.errors import EcgInputError

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "µv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}

# Sampling rates accepted from any source. Below 50 Hz nothing of the ECG's band survives (and resampling
# such a record up to the model's rate could take gigabytes); above 100 kHz the rate ratio to the model's
# rate no longer has a usable rational approximation.
MIN_FS_HZ = 50.0
MAX_FS_HZ = 100_000.0

# Bytes one sample takes in each WFDB storage format whose size is fixed (the FLAC formats 508/516/524 are
# compressed: their length is not checked before reading).
_WFDB_BYTES_PER_SAMPLE = {
    "8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3,
}  # fmt: skip


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


class ContentTooLargeError(EcgInputError):
    """The content of an upload is over one of the service's limits (413): its size (e.g. a .zip once
    expanded), a record's duration, the records or model windows of one request."""

    status_code = 413


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


def _check_signal_files(header_path: Path, header: wfdb.Record, file_names: list[str]) -> None:
    """Refuse signal files named with a path, and files too short for the samples the header declares.

    Checked before wfdb reads anything, so that a header claiming 10^12 samples never gets memory
    allocated for them and the message names the file.
    """
    for name in sorted(set(file_names)):
        if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise EcgInputError(
                f"{header_path.name} names the signal file '{name}': only plain file names beside the header "
                "are accepted"
            )
    if not header.sig_len:
        return  # no length in the header: wfdb infers it from the file size
    for name in sorted(set(file_names)):
        layout = _file_layout(header_path, header, file_names, name)
        if layout is None:
            continue
        frame_bytes, available = layout
        if available < math.floor(header.sig_len * frame_bytes):
            raise EcgInputError(
                f"{header_path.name}: the header declares {header.sig_len} samples but signal file '{name}' "
                f"holds only {int(available // frame_bytes)} (truncated, or the header's sample count "
                "is wrong)"
            )


def _file_layout(
    header_path: Path, header: wfdb.Record, file_names: list[str], name: str
) -> tuple[float, int] | None:
    """(bytes per frame, bytes of samples) of the signal file ``name`` beside the header; None when it is
    absent or stored in a format whose sample size is not fixed."""
    path = header_path.parent / name
    if not path.is_file():
        return None
    channels = [i for i, f in enumerate(file_names) if f == name]
    fmts = [str(header.fmt[i]) for i in channels]
    if any(fmt not in _WFDB_BYTES_PER_SAMPLE for fmt in fmts):
        return None
    spf = [(header.samps_per_frame or [1] * len(file_names))[i] or 1 for i in channels]
    frame_bytes = sum(_WFDB_BYTES_PER_SAMPLE[fmt] * n for fmt, n in zip(fmts, spf, strict=True))
    offset = (header.byte_offset or [None] * len(file_names))[channels[0]] or 0
    return frame_bytes, max(path.stat().st_size - offset, 0)


def declared_samples(header_path: Path, header: wfdb.Record, file_names: list[str]) -> int | None:
    """Samples per signal the record holds, before reading it: the header's length, else (no length in the
    header: wfdb reads what the files hold) the longest signal file of a fixed-size format; None when
    neither is known (e.g. FLAC files without a length)."""
    if header.sig_len:
        return int(header.sig_len)
    lengths = [
        int(layout[1] // layout[0])
        for name in sorted(set(file_names))
        if (layout := _file_layout(header_path, header, file_names, name)) is not None and layout[0]
    ]
    return max(lengths) if lengths else None


def check_declared_fs(header_path: Path) -> None:
    """Refuse a record line whose sampling frequency is written but is no positive finite number.

    wfdb's grammar reads a '-1' there as a counter frequency (and 'nan' or 'inf' as no field at all), so
    ``wfdb.rdheader`` would fall back to WFDB's default of 250 Hz: the record would be read at a rate its
    header never gave. A record line without the field (WFDB's default of 250 Hz) is left to wfdb.
    """
    try:
        lines, _ = parse_header_content(Path(header_path).read_text(encoding="ascii", errors="replace"))
        fields = lines[0].split()
    except (OSError, ValueError, IndexError):
        return  # not a readable header: wfdb's own error says so
    if len(fields) < 3:
        return
    written = fields[2].split("/")[0]  # fs[/counter_freq[(base_counter)]]
    try:
        fs = float(written)
    except ValueError:
        fs = math.nan
    if not math.isfinite(fs) or fs <= 0:
        raise EcgInputError(
            f"{Path(header_path).name}: the header's sampling frequency is '{written[:40]}': expected a "
            f"positive number of Hz, the third field of the record line (e.g. '{fields[0][:40]} "
            f"{fields[1][:10]} 500 5000' for 500 Hz)"
        )


def read_header_fields(header_path: Path) -> SimpleNamespace | None:
    """The fields of a plain single-segment ``.hea`` that ``read_wfdb`` checks before reading the signal
    (n_sig, fs, sig_len, and per signal file_name, fmt, samps_per_frame, byte_offset, sig_name), as
    ``wfdb.rdheader`` gives them; None for anything else (then ``wfdb.rdheader`` itself is asked).

    Parsed with wfdb's own header grammar (``wfdb.io.header``) in ~0.05 ms. ``wfdb.rdheader`` takes about
    2 ms (pandas look-ups typing every field), and ``wfdb.rdrecord`` reads the header again: checking with
    ``rdheader`` first made reading a PTB-XL record twice the cost of ``rdrecord`` alone.
    """
    try:
        lines, _ = parse_header_content(Path(header_path).read_text(encoding="ascii"))
        record = rx_record.match(lines[0])
        if record is None or record["n_seg"] or not record["fs"] or not record["sig_len"]:
            return None
        n_sig = int(record["n_sig"])
        signals = [rx_signal.match(line) for line in lines[1:]]
        if n_sig == 0 or len(signals) != n_sig or any(m is None or not m["fmt"] for m in signals):
            return None
        return SimpleNamespace(
            n_sig=n_sig,
            fs=float(record["fs"]),
            sig_len=int(record["sig_len"]),
            file_name=[m["file_name"] for m in signals],
            fmt=[m["fmt"] for m in signals],
            samps_per_frame=[int(m["samps_per_frame"] or 1) for m in signals],
            byte_offset=[int(m["byte_offset"]) if m["byte_offset"] else None for m in signals],
            sig_name=[m["sig_name"] for m in signals],
            adc_gain=[float(m["adc_gain"] or 0) for m in signals],
            baseline=[int(m["baseline"]) if m["baseline"] else None for m in signals],
            units=[m["units"] for m in signals],
            skew=[m["skew"] for m in signals],
        )
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        return None


def _read_format16(header_path: Path, header: SimpleNamespace) -> np.ndarray | None:
    """(samples, n_sig) physical float64 values of the commonest layout (PTB-XL's and most PhysioNet
    ECGs'): every signal in one format-16 file, one sample per frame, no skew or byte offset, gain,
    baseline and units given. Exactly what ``wfdb.rdrecord`` returns for it (its ``dac``: (d - baseline) /
    gain in float64, NaN at the invalid value -32768), without parsing the header a second time. None for
    any other layout (then ``wfdb.rdrecord`` reads it)."""
    simple = (
        len(set(header.file_name)) == 1
        and all(f == "16" for f in header.fmt)
        and all(n == 1 for n in header.samps_per_frame)
        and not any(header.skew)
        and not any(header.byte_offset)
        and all(header.adc_gain)
        and all(b is not None for b in header.baseline)
        and all(header.units)
    )
    path = header_path.parent / header.file_name[0]
    if not simple or path.stat().st_size != 2 * header.sig_len * header.n_sig:
        return None
    digital = np.fromfile(path, dtype="<i2").reshape(header.sig_len, header.n_sig)
    physical = digital.astype(np.float64)
    np.subtract(physical, np.array(header.baseline, dtype=np.float64), physical)
    np.divide(physical, np.array(header.adc_gain, dtype=np.float64), physical)
    physical[digital == -32768] = np.nan
    return physical


def read_wfdb(header_path: Path, limits: ReadLimits | None = None) -> Recording:
    """Read a WFDB record from its ``.hea`` file; signal files (.dat, .mat, ...) are looked up beside it.

    Any storage format wfdb reads works, including the MATLAB ``.mat`` signal files of wfdb2mat and of the
    PhysioNet/CinC challenges (the header gives the byte offset of the matrix). Channels stored in signal
    files that are absent are skipped when none of them is a standard lead (e.g. the Frank leads of PTB's
    ``.xyz`` files); a missing file holding a standard lead, or no signal file at all, is an error naming the
    file. Signal files must be plain names beside the header (no paths). ``limits`` (uploads): the record's
    length, from the header, is admitted before any sample is read.
    """
    header_path = Path(header_path)
    record_name = str(header_path.with_suffix(""))
    check_declared_fs(header_path)
    try:
        header = read_header_fields(header_path) or wfdb.rdheader(record_name)  # rdrecord reads it again
    except Exception as exc:  # wfdb raises many types for a malformed header
        raise EcgInputError(f"{header_path.name}: not a readable WFDB header ({exc})") from exc
    if not header.n_sig or header.sig_len == 0:
        raise EcgInputError(f"{header_path.name}: the header declares no signal samples")
    if not header.fs or header.fs <= 0:
        raise EcgInputError(f"{header_path.name}: the header has no valid sampling frequency")
    check_fs(header.fs, header_path.name)
    file_names = list(header.file_name or [])
    _check_signal_files(header_path, header, file_names)
    present = [i for i, name in enumerate(file_names) if (header_path.parent / name).is_file()]
    for name in sorted(set(file_names)):
        if (header_path.parent / name).is_file():
            continue
        holds = [header.sig_name[i] for i, f in enumerate(file_names) if f == name]
        if not present or any(canonical_lead_name(lead) for lead in holds):
            raise EcgInputError(
                f"{header_path.name} references signal file '{name}' (leads {', '.join(holds)}), "
                "which was not found: upload it together with the header"
            )
    if limits is not None and (samples := declared_samples(header_path, header, file_names)) is not None:
        limits.admit(header_path.name, samples, header.fs)
    fast = _read_format16(header_path, header) if isinstance(header, SimpleNamespace) else None
    if fast is not None:  # the header read once (read_header_fields), the signal straight from the file
        record = SimpleNamespace(p_signal=fast, units=header.units, sig_name=header.sig_name, comments=None)
        record.comments = parse_header_content(header_path.read_text(encoding="ascii"))[1]
    else:
        try:
            record = wfdb.rdrecord(record_name, channels=present, physical=True)
        except Exception as exc:
            raise EcgInputError(
                f"{header_path.name}: the signal file does not match its header "
                f"(truncated or wrong format?): {exc}"
            ) from exc
    signal = np.asarray(record.p_signal, dtype=np.float64).T  # (channels, samples)
    if header.sig_len and signal.shape[1] != header.sig_len:
        raise EcgInputError(
            f"{header_path.name}: the header declares {header.sig_len} samples but the signal file "
            f"holds {signal.shape[1]}"
        )
    if signal.shape[1] == 0:
        raise EcgInputError(f"{header_path.name}: the signal files hold no samples")
    units = record.units or [""] * len(present)
    for row, unit in enumerate(units):
        factor = _UNIT_TO_MV.get((unit or "").strip().lower())
        if factor is None:
            raise EcgInputError(f"{header_path.name}: unknown unit '{unit}' for lead {record.sig_name[row]}")
        signal[row] *= factor
    return Recording(
        signal=signal.astype(np.float32),
        fs=float(header.fs),
        lead_names=list(record.sig_name),
        source=header_path.name,
        comments=list(record.comments or []),
    )


def npy_header(data: bytes, source: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a ``.npy`` array from its header alone; refuses headers that claim more data than
    the file holds."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as exc:
        raise EcgInputError(f"{source}: not a NumPy .npy array ({exc})") from exc
    needed = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and needed > len(data) - stream.tell():
        raise EcgInputError(
            f"{source}: the array header declares shape {tuple(shape)} of {dtype} ({needed} bytes) but "
            f"the file holds {len(data) - stream.tell()} bytes of data (truncated?)"
        )
    return tuple(shape), dtype


def load_npy(data: bytes, source: str) -> np.ndarray:
    """A ``.npy`` array from bytes; refuses pickles and headers that claim more data than the file holds."""
    npy_header(data, source)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise EcgInputError(f"{source}: not a NumPy .npy array ({exc})") from exc


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


def read_npy(
    data: bytes,
    fs: float | None,
    lead_names: list[str] | None,
    source: str,
    limits: ReadLimits | None = None,
) -> Recording:
    """A ``.npy`` array of leads x samples (mV); the sampling rate must be given. Its shape is checked (and
    admitted to ``limits``) from the array header before the array is loaded."""
    if fs is None or fs <= 0:
        raise EcgInputError(f"{source}: a .npy upload needs its sampling rate: send the form field 'fs' (Hz)")
    shape, dtype = npy_header(data, source)
    check_array_shape(shape, dtype, source)
    if limits is not None:
        limits.admit(source, shape[1], fs)
    return recording_from_array(load_npy(data, source), fs, lead_names, source)


def _default_names(n_rows: int, source: str) -> list[str]:
    if n_rows == 12:
        return list(STANDARD_LEADS)
    raise EcgInputError(
        f"{source}: {n_rows} rows without lead names; send 'leads' (comma-separated names) or 12 rows "
        "in the standard order I, II, III, aVR, aVL, aVF, V1-V6"
    )


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

ACCEPTED_UPLOADS = (
    "a WFDB record (one .hea plus the signal files it names, e.g. .dat or .mat, sent as separate files or "
    "together in one .zip), one EDF/EDF+/BDF file (.edf, .bdf), one .npy or .npz array of leads x samples "
    "(form field 'fs' unless the .npz holds it), one .csv (header row of lead names, one column per lead; "
    "form field 'fs' or a 'time' column in seconds) or one .json "
    '({"fs": 500, "leads": ["I", ...], "signal": [[...], ...]})'
)


def read_upload(
    files: dict[str, bytes],
    workdir: Path,
    fs: float | None = None,
    lead_names: list[str] | None = None,
    limits: ReadLimits | None = None,
) -> Recording:
    """Read one ECG sent as files (name -> content); see ``ACCEPTED_UPLOADS`` for what is understood.

    ``workdir`` is an empty temporary directory the caller removes afterwards: nothing is written outside
    it. ``fs`` and ``lead_names`` are the client's form fields: required where the file does not carry them
    (.npy, CSV without a time column), they override what a .npz or JSON file says, and are ignored for the
    self-describing WFDB and EDF formats. ``limits`` (default: the settings' duration limit alone) admits
    the record before its samples are decoded: from the WFDB or EDF header, the .npy/.npz array header, the
    rows of a CSV with ``fs``; a record whose length shows only once read (JSON aside, which is checked
    once parsed, before conversion; a CSV whose rate comes from its time column) is admitted then.
    """
    limits = limits if limits is not None else ReadLimits.from_settings()
    admitted = limits.admitted
    recording = _read_upload(files, Path(workdir), fs, lead_names, limits)
    if limits.admitted == admitted:
        limits.admit(recording.source, recording.signal.shape[1], recording.fs)
    return recording


def _read_upload(
    files: dict[str, bytes], workdir: Path, fs: float | None, lead_names: list[str] | None, limits: ReadLimits
) -> Recording:
    from services.ecg import formats  # formats imports this module

    if not files:
        raise EcgInputError(f"no file uploaded: send {ACCEPTED_UPLOADS}")
    for name in files:
        if not _SAFE_NAME.match(name) or name.startswith("."):
            raise EcgInputError(f"file name '{name}' is not allowed: use letters, digits, '.', '_' and '-'")
    zips = [name for name in files if name.lower().endswith(".zip")]
    if zips:
        if len(files) > 1:
            raise EcgInputError(
                f"a .zip must be uploaded alone (got {', '.join(files)}): put the whole record in the .zip"
            )
        return formats.read_zip(files[zips[0]], zips[0], workdir, fs, lead_names, limits)
    headers = [name for name in files if name.lower().endswith(".hea")]
    if len(headers) > 1:
        raise EcgInputError(
            f"several WFDB headers uploaded ({', '.join(headers)}): send one record a request"
        )
    if headers:
        for name, content in files.items():
            (workdir / name).write_bytes(content)
        return read_wfdb(workdir / headers[0], limits)
    if len(files) == 1:
        name, content = next(iter(files.items()))
        recording = formats.read_single_file(name, content, workdir, fs, lead_names, limits=limits)
        if recording is not None:
            return recording
    names = ", ".join(files)
    signal_files = [n for n in files if n.lower().endswith((".dat", ".mat"))]
    if signal_files:
        raise EcgInputError(
            f"cannot read the upload ({names}): WFDB signal files ({', '.join(signal_files)}) need their "
            f".hea header; expected {ACCEPTED_UPLOADS}"
        )
    raise EcgInputError(f"cannot read the upload ({names}): expected {ACCEPTED_UPLOADS}")
