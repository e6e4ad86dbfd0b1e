"""Readers that turn an ECG on disk or an upload into one ``Recording``."""

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

from services.ecg.leads import canonical_lead_name
from services.errors import EcgInputError

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "µv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


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


def read_wfdb(header_path: Path) -> Recording:
    """Read a WFDB record from its ``.hea`` file; signal files are looked up beside it.

    Channels stored in signal files that are absent are skipped when none of them is a standard
    lead (e.g. the Frank leads of PTB's ``.xyz`` files); a missing file holding a standard lead, or
    no signal file at all, is an error naming the file.
    """
    header_path = Path(header_path)
    record_name = str(header_path.with_suffix(""))
    try:
        header = wfdb.rdheader(record_name)
    except Exception as exc:  # wfdb raises many types for a malformed header
        raise EcgInputError(f"{header_path.name}: not a readable WFDB header ({exc})") from exc
    if not header.n_sig or not header.sig_len:
        raise EcgInputError(f"{header_path.name}: the header declares no signal samples")
    if not header.fs or header.fs <= 0:
        raise EcgInputError(f"{header_path.name}: the header has no valid sampling frequency")
    file_names = list(header.file_name or [])
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
    try:
        record = wfdb.rdrecord(record_name, channels=present, physical=True)
    except Exception as exc:
        raise EcgInputError(
            f"{header_path.name}: the signal file does not match its header "
            f"(truncated or wrong format?): {exc}"
        ) from exc
    signal = np.asarray(record.p_signal, dtype=np.float64).T  # (channels, samples)
    if signal.shape[1] != header.sig_len:
        raise EcgInputError(
            f"{header_path.name}: the header declares {header.sig_len} samples but the signal file "
            f"holds {signal.shape[1]}"
        )
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
        comments=list(header.comments or []),
    )


def read_npy(data: bytes, fs: float | None, lead_names: list[str] | None, source: str) -> Recording:
    """A ``.npy`` array of leads x samples (mV); the sampling rate must be given."""
    if fs is None or fs <= 0:
        raise EcgInputError(f"{source}: a .npy upload needs its sampling rate: send the form field 'fs' (Hz)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise EcgInputError(f"{source}: not a NumPy .npy array ({exc})") from exc
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise EcgInputError(
            f"{source}: expected a numeric 2-D array of leads x samples, got shape {array.shape} "
            f"of {array.dtype}"
        )
    if array.size == 0:
        raise EcgInputError(f"{source}: the array holds no samples (shape {array.shape})")
    if array.shape[0] > array.shape[1]:
        raise EcgInputError(
            f"{source}: shape {array.shape} looks like samples x leads; expected leads x samples "
            "(transpose it)"
        )
    names = lead_names or _default_names(array.shape[0], source)
    if len(names) != array.shape[0]:
        raise EcgInputError(f"{source}: {len(names)} lead names given for {array.shape[0]} rows")
    return Recording(signal=array.astype(np.float32), fs=float(fs), lead_names=names, source=source)


def _default_names(n_rows: int, source: str) -> list[str]:
    if n_rows == 12:
        from services.ecg.leads import STANDARD_LEADS

        return list(STANDARD_LEADS)
    raise EcgInputError(
        f"{source}: {n_rows} rows without lead names; send 'leads' (comma-separated names) or 12 rows "
        "in the standard order I, II, III, aVR, aVL, aVF, V1-V6"
    )


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def read_upload(
    files: dict[str, bytes], workdir: Path, fs: float | None = None, lead_names: list[str] | None = None
) -> Recording:
    """Read one ECG sent as files (name -> content): a WFDB header with its signal files, or a ``.npy``.

    ``workdir`` is an empty temporary directory the caller removes afterwards.
    """
    if not files:
        raise EcgInputError("no file uploaded: send a WFDB record (.hea with its .dat) or a .npy array")
    for name in files:
        if not _SAFE_NAME.match(name) or name.startswith("."):
            raise EcgInputError(f"file name '{name}' is not allowed: use letters, digits, '.', '_' and '-'")
    headers = [name for name in files if name.lower().endswith(".hea")]
    if len(headers) > 1:
        raise EcgInputError(
            f"several WFDB headers uploaded ({', '.join(headers)}): send one record a request"
        )
    if headers:
        for name, content in files.items():
            (workdir / name).write_bytes(content)
        return read_wfdb(workdir / headers[0])
    npys = [name for name in files if name.lower().endswith(".npy")]
    if len(npys) == 1 and len(files) == 1:
        return read_npy(files[npys[0]], fs, lead_names, npys[0])
    names = ", ".join(files)
    raise EcgInputError(
        f"cannot read the upload ({names}): expected a WFDB record (one .hea plus the signal files it "
        "names, e.g. .dat) or one .npy array of leads x samples with the form field 'fs'"
    )
