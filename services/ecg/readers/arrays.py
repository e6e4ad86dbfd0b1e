"""NumPy arrays: ``.npy`` (leads x samples, the rate from the form field) and ``.npz`` (one record, with
optional ``fs``, ``leads`` and ``units`` arrays). Shapes are checked from the array headers, and pickles
refused, before any array is loaded."""

import io
import math
import zipfile
from pathlib import PurePosixPath

import numpy as np

from services.ecg.leads import lead_label
from services.ecg.readers.archive import read_member, safe_zip_members, upload_limit
from services.ecg.readers.units import voltage_factor
from services.ecg.recording import ReadLimits, Recording, check_array_shape, recording_from_array
from services.errors import EcgInputError


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
        for info, parts in safe_zip_members(archive, source, upload_limit()):
            arrays[PurePosixPath(*parts).name.removesuffix(".npy")] = read_member(archive, info, source)
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
        factor = voltage_factor(unit.decode() if isinstance(unit, bytes) else unit, source, "the signal")
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
