"""WFDB records: a ``.hea`` header and the signal files it names (.dat, .mat, ...) beside it.

The header is checked before any sample is read: a sampling frequency wfdb would silently replace, signal
files named with a path or too short for the samples declared, the record's length against
``ReadLimits``. The commonest layout (every signal in one format-16 file) is read straight from the file;
anything else by ``wfdb.rdrecord``.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import wfdb
from wfdb.io.header import parse_header_content, rx_record, rx_signal

from services.ecg.leads import canonical_lead_name
from services.ecg.recording import ReadLimits, Recording, check_fs
from services.errors import EcgInputError

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "µv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


# Bytes one sample takes in each WFDB storage format whose size is fixed (the FLAC formats 508/516/524 are
# compressed: their length is not checked before reading).
_WFDB_BYTES_PER_SAMPLE = {
    "8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3,
}  # fmt: skip


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
