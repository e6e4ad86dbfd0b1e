"""ECG file formats besides WFDB and .npy: EDF/EDF+/BDF, .npz, CSV, JSON, and records sent as one .zip.

Every reader returns one ``Recording`` (mV, float32, leads x samples) or raises ``EcgInputError`` with a
message saying what is wrong and where (line and column of a CSV, the channel of an EDF, the member of a
zip). ``read_upload`` in ``services.ecg.recording`` dispatches to them on the file names.

Zip safety (``safe_zip_members``/``extract_zip``): at most ``MAX_ZIP_MEMBERS`` members; no absolute paths,
drive letters, ``..`` components, symbolic links or other special files, no encrypted or duplicate
members; the declared uncompressed sizes together must stay within the upload limit and no member over
``RATIO_CHECK_MIN_BYTES`` may expand more than ``MAX_COMPRESSION_RATIO``-fold; while extracting, the real
bytes are counted and extraction stops as soon as they exceed the declared size or the limit. Members are
written only below the given directory, each to a path checked to resolve inside it, never overwriting.
"""

import csv
import io
import json
import re
import stat
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np

from services.config import get_settings
from services.ecg.leads import canonical_lead_name
from services.ecg.recording import (
    ACCEPTED_UPLOADS,
    ContentTooLargeError,
    ReadLimits,
    Recording,
    check_array_shape,
    check_fs,
    load_npy,
    npy_header,
    read_npy,
    read_wfdb,
    recording_from_array,
)
from services.errors import EcgInputError

MAX_ZIP_MEMBERS = 64
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1024 * 1024  # small members may compress well (headers, padding) and are harmless
_CHUNK = 64 * 1024

# Physical units of voltage and their factor to mV (EDF dimensions, JSON/CSV/.npz "units").
VOLTAGE_TO_MV = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6}

_ANNOTATION_LABELS = {"edf annotations", "bdf annotations"}
_ECG_WORD = re.compile(r"\b(?:ecg|ekg)", re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"^(?:ecg|ekg)[\s_:\-]*(?:lead[\s_:\-]*)?", re.IGNORECASE)
_TIME_COLUMNS = {"time", "t", "time_s", "time (s)", "t (s)", "time[s]", "time [s]", "t_s", "seconds"}
_INDEX_COLUMNS = {"", "unnamed: 0", "index"}
_UNIT_SUFFIX = re.compile(r"^(.*?)\s*[\(\[]\s*(v|mv|uv|µv|μv|nv)\s*[\)\]]$", re.IGNORECASE)


def lead_label(raw: str) -> str:
    """A channel label as a lead name: 'ECG I', 'EKG-V1', 'ECG lead aVR' become I, V1, aVR; others kept."""
    name = raw.strip()
    if canonical_lead_name(name):
        return name
    stripped = _LABEL_PREFIX.sub("", name).strip()
    return stripped if canonical_lead_name(stripped) else name


def _voltage_factor(unit: str, source: str, what: str) -> float:
    factor = VOLTAGE_TO_MV.get(unit.strip().lower())
    if factor is None:
        raise EcgInputError(f"{source}: unknown unit '{unit}' for {what}: expected one of uV, mV, V")
    return factor


def _limit() -> int:
    return get_settings().upload_max_bytes


# --------------------------------------------------------------------------------------------------
# text decoding shared by CSV and JSON


def _decode_text(data: bytes, source: str, kind: str) -> str:
    if b"\x00" in data:
        raise EcgInputError(
            f"{source}: this is a binary file, not {kind} text (it contains NUL bytes); send {kind} as UTF-8 "
            "text, or the file under its own extension (.edf, .npy, .dat with its .hea, ...)"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EcgInputError(
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): save the {kind} "
            f"as UTF-8 (a binary file cannot be read as {kind})"
        ) from None


# --------------------------------------------------------------------------------------------------
# CSV


def _sniff_delimiter(line: str) -> str:
    counts = {d: line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_csv(
    data: bytes,
    fs: float | None,
    lead_names: list[str] | None,
    source: str,
    limits: ReadLimits | None = None,
) -> Recording:
    """CSV of one column per lead (values in mV) and one row per sample, under a header row of lead names.

    The delimiter may be ',', ';' or a tab (with ';' or tab, decimal commas are accepted; Excel's 'sep=;'
    first line is understood); lines starting with '#' are skipped; an empty cell is a missing sample
    (NaN). A column named ``time`` or ``t`` (seconds) gives the sampling rate when the form field ``fs`` is
    absent; a column named ``index`` or with an empty name is ignored. Header names may carry a unit, e.g.
    ``V1 (uV)``. ``limits``: with the form field ``fs``, the record is admitted from its number of rows
    before the cells are parsed; with a time column, once that column gives the rate.
    """
    text = _decode_text(data, source, "CSV")
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1)]
    numbered = [(n, line) for n, line in numbered if line.strip() and not line.lstrip().startswith("#")]
    if numbered and numbered[0][1].strip().lower().startswith("sep=") and len(numbered[0][1].strip()) == 5:
        delimiter = numbered.pop(0)[1].strip()[4]  # Excel's delimiter line
    else:
        delimiter = _sniff_delimiter(numbered[0][1]) if numbered else ","
    if not numbered:
        raise EcgInputError(f"{source}: the CSV file is empty")
    try:
        header = [cell.strip() for cell in next(csv.reader([numbered[0][1]], delimiter=delimiter))]
    except (csv.Error, StopIteration) as exc:
        raise EcgInputError(f"{source}: not a readable CSV file ({exc})") from None
    headerless = all(_is_number(cell) for cell in header if cell)
    if limits is not None and fs is not None:  # the rows are the samples: admitted before parsing them
        limits.admit(source, len(numbered) - (0 if headerless else 1), fs)
    try:
        rows = list(csv.reader([line for _, line in numbered], delimiter=delimiter))
    except csv.Error as exc:
        raise EcgInputError(f"{source}: not a readable CSV file ({exc})") from None
    line_numbers = [n for n, _ in numbered]
    if len(header) > 2 and not _is_number(header[0]) and all(_is_number(c) for c in header[1:] if c):
        raise EcgInputError(
            f"{source}: the first row is '{header[0]}' followed by numbers: this looks like one row per "
            "lead; expected a header row of lead names over one column per lead (rows are samples): "
            "transpose it"
        )
    if headerless:
        if not lead_names:
            raise EcgInputError(
                f"{source}: the first row must name the leads (e.g. I,II,III,...,V6), found numbers "
                f"({', '.join(header[:4])}...); add a header row or send the form field 'leads'"
            )
        header, data_rows, data_lines = list(lead_names), rows, line_numbers
        if len(header) != len(rows[0]):
            raise EcgInputError(f"{source}: {len(header)} lead names given for {len(rows[0])} columns")
    else:
        data_rows, data_lines = rows[1:], line_numbers[1:]
    columns, time_col, factors = [], None, []
    for j, name in enumerate(header):
        key = name.lower()
        if key in _TIME_COLUMNS and time_col is None:
            time_col = j
        elif key not in _INDEX_COLUMNS:
            unit = _UNIT_SUFFIX.match(name)
            columns.append((j, unit.group(1) if unit else name))
            factors.append(_voltage_factor(unit.group(2), source, f"column '{name}'") if unit else 1.0)
    if not columns:
        raise EcgInputError(f"{source}: no lead column in the header ({', '.join(header)})")
    if not data_rows:
        raise EcgInputError(f"{source}: the CSV holds no samples (no data row below the header)")
    width = len(header)
    for row, line in zip(data_rows, data_lines, strict=True):
        if len(row) != width:
            raise EcgInputError(
                f"{source}: line {line} has {len(row)} cells but the header has {width} columns"
            )
    wanted = [j for j, _ in columns] + ([time_col] if time_col is not None else [])
    values = _parse_columns(data_rows, data_lines, wanted, header, delimiter, source)
    signal = values[: len(columns)] * np.asarray(factors)[:, None]
    if time_col is not None:
        derived = _fs_from_time(values[-1], data_lines, source, header[time_col])
        if fs is not None and abs(derived - fs) > 0.01 * fs:
            raise EcgInputError(
                f"{source}: the form field fs={fs:g} Hz contradicts the '{header[time_col]}' column, which "
                f"spaces samples at {derived:g} Hz"
            )
        if fs is None and limits is not None:
            limits.admit(source, len(data_rows), derived)
        fs = fs if fs is not None else derived
    names = [lead_label(name) for name in (lead_names or [name for _, name in columns])]
    if len(names) != len(columns):
        raise EcgInputError(f"{source}: {len(names)} lead names given for {len(columns)} lead columns")
    fs = check_fs(fs, source, ": send the form field 'fs' (Hz) or a 'time' column in seconds")
    return Recording(signal=signal.astype(np.float32), fs=fs, lead_names=names, source=source)


def _parse_columns(
    rows: list[list[str]], lines: list[int], wanted: list[int], header: list[str], delimiter: str, source: str
) -> np.ndarray:
    """The ``wanted`` columns as floats, (len(wanted), len(rows)); errors name the line and column."""
    decimal_comma = delimiter != ","
    cells = []
    for row in rows:
        picked = [row[j].strip() for j in wanted]
        if decimal_comma:
            picked = [c.replace(",", ".") for c in picked]
        cells.append([c if c else "nan" for c in picked])
    try:
        return np.array(cells, dtype=np.float64).T
    except ValueError:
        pass
    for row, line in zip(cells, lines, strict=True):
        for j, cell in zip(wanted, row, strict=True):
            if not _is_number(cell):
                raise EcgInputError(
                    f"{source}: line {line}, column '{header[j]}' (column {j + 1}): {cell[:40]!r} "
                    "is not a number"
                )
    raise EcgInputError(f"{source}: the CSV cells could not be read as numbers")  # pragma: no cover


def _fs_from_time(t: np.ndarray, lines: list[int], source: str, column: str) -> float:
    """Sampling rate from a time column in seconds: strictly increasing and evenly spaced."""
    if len(t) < 2 or not np.isfinite(t).all():
        raise EcgInputError(f"{source}: the '{column}' column needs at least two finite times to give a rate")
    steps = np.diff(t)
    if (steps <= 0).any():
        line = lines[int(np.argmax(steps <= 0)) + 1]
        raise EcgInputError(f"{source}: the '{column}' column does not increase at line {line}")
    fs = (len(t) - 1) / (t[-1] - t[0])
    step_error = np.abs(steps * fs - 1).max()  # in sampling periods
    drift = np.abs(t - (t[0] + np.arange(len(t)) / fs)).max() * fs
    if max(step_error, drift) > 0.5:
        line = lines[int(np.argmax(np.abs(steps * fs - 1))) + 1]
        raise EcgInputError(
            f"{source}: the '{column}' column is not evenly spaced (at {fs:g} Hz, line {line} is off by "
            f"{max(step_error, drift):.1f} samples); resample the record to a fixed rate"
        )
    return float(round(fs)) if abs(fs - round(fs)) < 1e-3 * fs else float(fs)


# --------------------------------------------------------------------------------------------------
# JSON


_JSON_SHAPE = '{"fs": 500, "leads": ["I", ...], "signal": [[...], ...]} (leads x samples)'


def read_json(
    data: bytes,
    fs: float | None,
    lead_names: list[str] | None,
    source: str,
    limits: ReadLimits | None = None,
) -> Recording:
    """JSON object ``{"fs", "leads", "signal"}`` with ``signal`` leads x samples (or ``{lead: samples}``).

    Optional ``"units"`` ("uV", "mV", "V"; default mV). ``null`` samples are missing (NaN). The form
    fields ``fs`` and ``leads`` override the file's. ``limits``: the record is admitted once the JSON is
    parsed, before its values are checked and converted.
    """
    text = _decode_text(data, source, "JSON")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EcgInputError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. nesting too deep, an integer of 5000 digits
        raise EcgInputError(f"{source}: not readable JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(obj, dict):
        raise EcgInputError(f"{source}: expected a JSON object {_JSON_SHAPE}, got a {type(obj).__name__}")
    key = "signal" if "signal" in obj else "signals" if "signals" in obj else None
    if key is None:
        raise EcgInputError(
            f"{source}: no 'signal' in the JSON object (keys: {', '.join(map(str, obj)) or 'none'}); "
            f"expected {_JSON_SHAPE}"
        )
    raw, file_leads = obj[key], obj.get("leads", obj.get("lead_names"))
    if isinstance(raw, dict):
        file_leads, raw = list(raw), list(raw.values())
    if not isinstance(raw, list) or not raw or not all(isinstance(row, list) for row in raw):
        raise EcgInputError(
            f"{source}: '{key}' must be a non-empty list of leads, each a list of samples: {_JSON_SHAPE}"
        )
    lengths = {len(row) for row in raw}
    if len(lengths) > 1:
        raise EcgInputError(
            f"{source}: the leads of '{key}' differ in length "
            f"({', '.join(str(len(r)) for r in raw[:12])}...): "
            "every lead needs the same number of samples"
        )
    file_fs = obj.get("fs")
    if limits is not None:
        limits.admit(source, lengths.pop(), fs if fs is not None else file_fs)
    for i, row in enumerate(raw):
        for k, value in enumerate(row):
            if value is not None and (type(value) not in (int, float)):
                raise EcgInputError(f"{source}: {key}[{i}][{k}] is {json.dumps(value)[:40]}, not a number")
    try:
        signal = np.array(raw, dtype=np.float64)  # null -> NaN
    except OverflowError:
        raise EcgInputError(f"{source}: '{key}' holds an integer too large for a sample value") from None
    if file_leads is not None and (
        not isinstance(file_leads, list) or not all(isinstance(n, str) for n in file_leads)
    ):
        raise EcgInputError(f"{source}: 'leads' must be a list of lead names (strings)")
    units = obj.get("units", "mV")
    if not isinstance(units, str):
        raise EcgInputError(f'{source}: \'units\' must be a string such as "uV" or "mV"')
    signal *= _voltage_factor(units, source, "the signal")
    if file_fs is not None and (isinstance(file_fs, bool) or not isinstance(file_fs, int | float)):
        raise EcgInputError(f"{source}: 'fs' must be a number of Hz, got {json.dumps(file_fs)[:40]}")
    names = lead_names or file_leads
    return recording_from_array(
        signal,
        fs if fs is not None else file_fs,
        [lead_label(n) for n in names] if names else None,
        source,
        ": put \"fs\" in the JSON object or send the form field 'fs' (Hz)",
    )


# --------------------------------------------------------------------------------------------------
# .npz


def read_npz(
    data: bytes,
    fs: float | None,
    lead_names: list[str] | None,
    source: str,
    limits: ReadLimits | None = None,
) -> Recording:
    """A NumPy ``.npz`` with one record: array ``signal`` (or ``signals``) of leads x samples, optional
    ``fs``, ``leads``/``lead_names`` and ``units``; the form fields override the file's. The signal's shape
    is checked (and admitted to ``limits``) from its array header before it is loaded."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise EcgInputError(f"{source}: not a NumPy .npz archive ({exc})") from None
    with archive:
        arrays: dict[str, bytes] = {}
        for info, parts in safe_zip_members(archive, source, _limit()):
            arrays[PurePosixPath(*parts).name.removesuffix(".npy")] = _read_member(archive, info, source)
    key = "signal" if "signal" in arrays else "signals" if "signals" in arrays else None
    if key is None:
        raise EcgInputError(
            f"{source}: no array named 'signal' (leads x samples) in the .npz; found: "
            f"{', '.join(arrays) or 'nothing'}"
        )
    shape, dtype = npy_header(arrays[key], f"{source}:{key}")
    if len(shape) == 3:
        if shape[0] != 1:
            raise EcgInputError(
                f"{source}: '{key}' holds {shape[0]} records (shape {shape}); send one record "
                "(leads x samples) a request"
            )
        shape = shape[1:]
    check_array_shape(shape, dtype, source)
    file_fs = None
    if "fs" in arrays:
        value = load_npy(arrays["fs"], f"{source}:fs")
        if value.size != 1 or value.dtype.kind not in "iuf":
            raise EcgInputError(
                f"{source}: 'fs' must be one number (Hz), got shape {value.shape} of {value.dtype}"
            )
        file_fs = float(value.reshape(()))
    file_leads = None
    for name in ("leads", "lead_names"):
        if name in arrays:
            value = load_npy(arrays[name], f"{source}:{name}")
            if value.ndim != 1 or value.dtype.kind not in "US":
                raise EcgInputError(f"{source}: '{name}' must be a 1-D array of strings, got {value.dtype}")
            file_leads = [str(v.decode() if isinstance(v, bytes) else v) for v in value]
            break
    factor = 1.0
    if "units" in arrays:
        value = load_npy(arrays["units"], f"{source}:units")
        if value.size != 1 or value.dtype.kind not in "US":
            raise EcgInputError(f"{source}: 'units' must be one string such as 'uV' or 'mV'")
        unit = value.reshape(()).item()
        factor = _voltage_factor(unit.decode() if isinstance(unit, bytes) else unit, source, "the signal")
    if limits is not None:
        limits.admit(source, shape[1], fs if fs is not None else file_fs)
    signal = load_npy(arrays[key], f"{source}:{key}").reshape(shape)
    names = lead_names or file_leads
    recording = recording_from_array(
        signal,
        fs if fs is not None else file_fs,
        [lead_label(n) for n in names] if names else None,
        source,
        ": store an array 'fs' in the .npz or send the form field 'fs' (Hz)",
    )
    if factor != 1.0:
        recording.signal = (recording.signal.astype(np.float64) * factor).astype(np.float32)
    return recording


# --------------------------------------------------------------------------------------------------
# EDF / EDF+ / BDF


class EdfSupportMissingError(EcgInputError):
    status_code = 501


def read_edf(path: Path, source: str, limits: ReadLimits | None = None) -> Recording:
    """EDF, EDF+ or BDF(+) via pyedflib: the ECG channels at their most common sampling rate, in mV.

    ECG channels: those labelled like a lead or as ECG/EKG ('I', 'ECG V1', 'EKG') with a voltage unit (uV,
    mV, V) or none (taken as mV); when no channel is labelled so, every channel with a voltage unit. Of
    these, the channels at the most common rate are read (ties: the higher rate); annotation channels,
    other signals (respiration, SpO2, EEG beside labelled ECG, ...) and ECG channels at other rates are
    ignored and listed in ``comments``. Labels such as 'ECG II' become II. ``limits``: the record is
    admitted from the EDF header (samples of the chosen channels) before any of them is read.
    """
    try:
        import pyedflib
    except ImportError:  # a deployment without the optional reader: say so instead of a bare 500
        raise EdfSupportMissingError(
            f"{source}: this server cannot read EDF files (the pyedflib package is not installed)"
        ) from None
    try:
        reader = pyedflib.EdfReader(str(path))
    except Exception as exc:  # OSError for anything not EDF-compliant, with edflib's reason
        reason = str(exc).replace(str(path), path.name)
        raise EcgInputError(f"{source}: not a readable EDF/EDF+/BDF file ({reason})") from None
    try:
        n = reader.signals_in_file
        labels = [str(label).strip() for label in reader.getSignalLabels()]
        rates = [float(r) for r in reader.getSampleFrequencies()]
        units = [str(reader.getPhysicalDimension(i)).strip() for i in range(n)]

        def describe(i: int) -> str:
            return f"{labels[i] or '(no label)'} ({units[i] or 'no unit'}, {rates[i]:g} Hz)"

        named, voltage, others = [], [], []
        for i in range(n):
            if labels[i].lower() in _ANNOTATION_LABELS:
                continue
            factor = VOLTAGE_TO_MV.get(units[i].lower())
            is_ecg = bool(canonical_lead_name(lead_label(labels[i])) or _ECG_WORD.search(labels[i]))
            if factor is None and not units[i] and is_ecg:
                factor = 1.0  # an ECG channel without unit: taken as mV
            if factor is None:
                others.append(describe(i))
            else:
                (named if is_ecg else voltage).append((i, factor))
        ecg = named or voltage
        if not ecg:
            raise EcgInputError(
                f"{source}: no ECG channel (one labelled like a lead or ECG, e.g. 'ECG II', or in uV/mV/V); "
                f"found: {', '.join(others) or 'no signal channel at all'}"
            )
        if named:
            others += [describe(i) for i, _ in voltage]
        counts = Counter(rates[i] for i, _ in ecg)
        best = max(counts, key=lambda r: (counts[r], r))
        chosen = [(i, f) for i, f in ecg if rates[i] == best]
        dropped = [f"{labels[i]} ({rates[i]:g} Hz)" for i, _ in ecg if rates[i] != best]
        if limits is not None:
            counts_per_channel = reader.getNSamples()
            limits.admit(source, int(max(counts_per_channel[i] for i, _ in chosen)), best)
        signals = [reader.readSignal(i) * factor for i, factor in chosen]
    finally:
        reader.close()
    length = min(len(s) for s in signals)
    if length == 0:
        raise EcgInputError(f"{source}: the EDF file holds no samples")
    comments = [f"ECG channels at other rates ignored: {', '.join(dropped)}"] if dropped else []
    if others:
        comments.append(f"other channels ignored: {', '.join(others)}")
    return Recording(
        signal=np.stack([s[:length] for s in signals]).astype(np.float32),
        fs=check_fs(best, source),
        lead_names=[lead_label(labels[i]) for i, _ in chosen],
        source=source,
        comments=comments,
    )


# --------------------------------------------------------------------------------------------------
# zip


def safe_zip_members(
    archive: zipfile.ZipFile, source: str, limit: int
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The regular-file members worth reading, as (info, path parts), after the safety checks (see top)."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise EcgInputError(
            f"{source}: {len(infos)} members in the archive; at most {MAX_ZIP_MEMBERS} accepted"
        )
    members, seen, total = [], set(), 0
    for info in infos:
        raw = info.filename
        name = raw.replace("\\", "/")
        if "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise EcgInputError(
                f"{source}: member '{raw}' has an absolute path; only relative paths are accepted"
            )
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise EcgInputError(f"{source}: member '{raw}' points outside the archive ('..' in its path)")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise EcgInputError(
                f"{source}: member '{raw}' is a symbolic link; only regular files are accepted"
            )
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise EcgInputError(f"{source}: member '{raw}' is not a regular file")
        if info.flag_bits & 0x1:
            raise EcgInputError(f"{source}: member '{raw}' is encrypted; send an unencrypted archive")
        if info.is_dir() or not parts:
            continue
        if parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue  # macOS resource forks, .DS_Store and other hidden files
        key = "/".join(parts).lower()
        if key in seen:
            raise EcgInputError(f"{source}: member '{raw}' appears twice in the archive")
        seen.add(key)
        size, packed = info.file_size, info.compress_size
        if size > RATIO_CHECK_MIN_BYTES and size > MAX_COMPRESSION_RATIO * max(packed, 1):
            raise EcgInputError(
                f"{source}: member '{raw}' would expand from {packed} to {size} bytes ("
                f"{size / max(packed, 1):.0f}:1, over {MAX_COMPRESSION_RATIO}:1): "
                "refused as a possible zip bomb"
            )
        total += size
        if total > limit:
            raise ContentTooLargeError(
                f"{source}: the archive expands to more than the upload limit of {limit} bytes"
            )
        members.append((info, parts))
    return members


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out, source: str, budget: int) -> int:
    """Decompress one member into ``out``, counting real bytes: stop past its declared size or ``budget``."""
    written = 0
    try:
        with archive.open(info) as member:
            while chunk := member.read(_CHUNK):
                written += len(chunk)
                if written > info.file_size:
                    raise EcgInputError(
                        f"{source}: member '{info.filename}' holds more data than its declared "
                        f"{info.file_size} bytes: refused"
                    )
                if written > budget:
                    raise ContentTooLargeError(
                        f"{source}: the archive expands to more than the upload limit: extraction stopped"
                    )
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise EcgInputError(f"{source}: member '{info.filename}' cannot be decompressed ({exc})") from None
    return written


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    buffer = io.BytesIO()
    _copy_member(archive, info, buffer, source, _limit())
    return buffer.getvalue()


def extract_zip(data: bytes, dest: Path, source: str, limit: int | None = None) -> list[Path]:
    """Safely extract a .zip upload into the new directory ``dest``; the extracted files' paths."""
    limit = _limit() if limit is None else limit
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise EcgInputError(f"{source}: not a valid .zip archive ({exc})") from None
    paths = []
    with archive:
        members = safe_zip_members(archive, source, limit)
        dest.mkdir()
        root = dest.resolve()
        budget = limit
        for info, parts in members:
            target = root.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise EcgInputError(f"{source}: member '{info.filename}' points outside the archive")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "xb") as out:
                    budget -= _copy_member(archive, info, out, source, budget)
            except OSError as exc:
                raise EcgInputError(
                    f"{source}: member '{info.filename}' cannot be extracted ({exc})"
                ) from None
            paths.append(target)
    return paths


def read_zip(
    data: bytes,
    name: str,
    workdir: Path,
    fs: float | None,
    lead_names: list[str] | None,
    limits: ReadLimits | None = None,
) -> Recording:
    """One record in a .zip (possibly in a subfolder): a WFDB record, or one file of another format."""
    root = Path(workdir) / "zip"
    paths = extract_zip(data, root, name)
    relative = {path: path.relative_to(root.resolve()).as_posix() for path in paths}
    headers = [p for p in paths if p.suffix.lower() == ".hea"]
    if len(headers) > 1:
        raise EcgInputError(
            f"{name}: several WFDB headers in the archive ({', '.join(relative[p] for p in headers)}): "
            "send one record a request"
        )
    if not headers and (len(paths) != 1 or paths[0].name.lower().endswith(".zip")):
        listing = ", ".join(relative[p] for p in paths[:10]) or "no file"
        raise EcgInputError(
            f"{name}: the archive must hold one record (a .hea with its signal files, or one .edf/.csv/.json/"
            f".npy/.npz file); it holds {listing}"
        )
    path = headers[0] if headers else paths[0]
    try:
        if headers:
            recording = read_wfdb(path, limits)
        else:
            recording = read_single_file(
                path.name, path.read_bytes(), path.parent, fs, lead_names, path=path, limits=limits
            )
    except EcgInputError as exc:  # say which archive the file came from
        raise type(exc)(f"{name}: {exc}") from None
    if recording is None:
        raise EcgInputError(
            f"{name}: cannot read '{relative[path]}' from the archive: expected {ACCEPTED_UPLOADS}"
        )
    recording.source = f"{name}:{relative[path]}"
    return recording


# --------------------------------------------------------------------------------------------------
# dispatch of one file


def read_single_file(
    name: str,
    data: bytes,
    workdir: Path,
    fs: float | None,
    lead_names: list[str] | None,
    path: Path | None = None,
    limits: ReadLimits | None = None,
) -> Recording | None:
    """Read one self-contained file by its extension; None when the extension is not one of them."""
    suffix = Path(name).suffix.lower()
    if suffix == ".npy":
        return read_npy(data, fs, lead_names, name, limits)
    if suffix == ".npz":
        return read_npz(data, fs, lead_names, name, limits)
    if suffix in (".csv", ".tsv"):
        return read_csv(data, fs, lead_names, name, limits)
    if suffix == ".json":
        return read_json(data, fs, lead_names, name, limits)
    if suffix in (".edf", ".bdf"):
        if path is None:
            path = Path(workdir) / name
            path.write_bytes(data)
        return read_edf(path, name, limits)
    return None
