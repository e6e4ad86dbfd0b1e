"""Uploads: which reader an upload goes to, from its file names.

``read_upload`` is the one entry point for the files of one request (name -> content): a ``.zip`` is
extracted safely and its one record read, a ``.hea`` goes with its signal files to the WFDB reader, one
self-contained file to the reader of its extension (``read_single_file``). ``ACCEPTED_UPLOADS`` says what
is understood, in the words of the error messages and the API documentation.
"""

import re
from pathlib import Path

from services.ecg.readers.archive import extract_zip
from services.ecg.readers.arrays import read_npy, read_npz
from services.ecg.readers.edf import read_edf
from services.ecg.readers.text import read_csv, read_json
from services.ecg.readers.wfdb_record import read_wfdb
from services.ecg.recording import ReadLimits, Recording
from services.errors import EcgInputError

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
        return read_zip(files[zips[0]], zips[0], workdir, fs, lead_names, limits)
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
        recording = read_single_file(name, content, workdir, fs, lead_names, limits=limits)
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
