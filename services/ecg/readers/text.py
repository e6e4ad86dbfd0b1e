"""Text formats: CSV (one column per lead under a header row of lead names) and JSON
(``{"fs", "leads", "signal"}``)."""

import csv
import json
import re

import numpy as np

from services.ecg.leads import lead_label
from services.ecg.readers.units import voltage_factor
from services.ecg.recording import ReadLimits, Recording, check_fs, recording_from_array
from services.errors import EcgInputError

_TIME_COLUMNS = {"time", "t", "time_s", "time (s)", "t (s)", "time[s]", "time [s]", "t_s", "seconds"}


_INDEX_COLUMNS = {"", "unnamed: 0", "index"}


_UNIT_SUFFIX = re.compile(r"^(.*?)\s*[\(\[]\s*(v|mv|uv|µv|μv|nv)\s*[\)\]]$", re.IGNORECASE)


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
            factors.append(voltage_factor(unit.group(2), source, f"column '{name}'") if unit else 1.0)
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
    signal *= voltage_factor(units, source, "the signal")
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
