"""Split an upload that carries several ECG records into one group of files per record.

- a WFDB header (``.hea``) takes the signal files it names (and files sharing its stem in its folder);
- every ``.npy``, ``.npz``, ``.csv``, ``.tsv``, ``.json``, ``.edf``, ``.bdf`` is a record on its own;
- a ``.zip`` is expanded (with the single-record upload's guards) and split the same way, folder by folder.

Records come out in upload order (a WFDB record where its header is). Whatever cannot become a record (a
signal file no header names, an unreadable archive) comes out as an entry carrying the error, so that it is
reported in its place without failing the others.

What one inference request may carry (``request_limits``, ``batch_records``): at most
``ECGSSL_SERVE_MAX_RECORDS`` records (records, not files: counted from the file names and the zips' listings
before anything is extracted), each at most ``ECGSSL_UPLOAD_MAX_SECONDS`` long, and at most
``ECGSSL_SERVE_MAX_WINDOWS`` model windows together, each checked before a sample is decoded. A request over
one of these limits fails as a whole (``TooLargeError``); a single-record request holding several records
fails with ``SeveralRecordsError``.
"""

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from services.config import get_settings
from services.ecg.preprocess import InputSpec, Windowing, window_count
from services.ecg.readers import extract_zip
from services.ecg.readers.archive import MAX_ZIP_MEMBERS, zip_member_names
from services.ecg.recording import ContentTooLargeError, ReadLimits, Recording, TooManyWindowsError
from services.ecg.upload import ACCEPTED_UPLOADS, read_upload
from services.errors import ClientError, EcgInputError, TooLargeError
from services.inference.sessions import SESSIONS, LoadedModel, Precision, ServedModel, Timing

SINGLE_FILE_SUFFIXES = (".npy", ".npz", ".csv", ".tsv", ".json", ".edf", ".bdf")
ZIP_MEMBERS_PER_RECORD = 16  # a batch's .zip may hold this many files per record the request may carry


@dataclass
class Upload:
    """An inference request's upload: its files (name -> content, in upload order) and form fields."""

    files: dict[str, bytes]
    fs: float | None = None  # sampling rate for records that do not carry one
    lead_names: list[str] | None = None  # names of the rows/columns of array and text records
    model: str | None = None  # the model reference (``services.registry.resolve_reference``)
    precision: Precision | None = None  # the ONNX variant asked for (None: the setting)


class SeveralRecordsError(EcgInputError):
    """A request that takes one record holds several (``labels``: each record's name)."""

    def __init__(self, labels: list[str]):
        shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
        what = "WFDB headers" if all(label.lower().endswith(".hea") for label in labels) else "records"
        super().__init__(f"several {what} uploaded ({shown}): the upload holds {len(labels)} records")
        self.labels = labels


@dataclass
class RecordFiles:
    """One record's files (name -> content), or the error that keeps it from being read."""

    label: str  # how the result names it: the header or file name, 'archive.zip:folder/name.hea'
    files: dict[str, bytes]
    error: ClientError | None = None


def header_signal_files(text: str) -> list[str]:
    """The signal file names a WFDB header lists (its first column after the record line)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        return []
    record = lines[0].split()
    try:
        n_signals = int(record[1]) if len(record) > 1 else 0
    except ValueError:
        return []
    names = []
    for line in lines[1 : 1 + n_signals]:
        name = line.split()[0]
        if name != "~" and name not in names:
            names.append(name)
    return names


def _group(order: list[str], data: dict[str, bytes], prefix: str) -> list[tuple[int, RecordFiles]]:
    """Group the files at paths ``order`` (posix, relative) into records: (position, record)."""
    groups: list[tuple[int, RecordFiles]] = []
    claimed: set[str] = set()
    for position, path in enumerate(order):
        header = PurePosixPath(path)
        if header.suffix.lower() != ".hea":
            continue
        folder = header.parent
        try:
            names = header_signal_files(data[path].decode("latin-1"))
        except Exception:
            names = []
        files = {header.name: data[path]}
        for other in order:
            candidate = PurePosixPath(other)
            if candidate.parent != folder or other == path:
                continue
            named = candidate.name in names
            same_stem = candidate.stem == header.stem and candidate.suffix.lower() not in (
                ".hea",
                ".zip",
                *SINGLE_FILE_SUFFIXES,
            )
            if named or same_stem:
                files[candidate.name] = data[other]
                claimed.add(other)
        groups.append((position, RecordFiles(f"{prefix}{path}", files)))
    for position, path in enumerate(order):
        pure = PurePosixPath(path)
        suffix = pure.suffix.lower()
        if suffix == ".hea" or path in claimed:
            continue
        if suffix in SINGLE_FILE_SUFFIXES:
            groups.append((position, RecordFiles(f"{prefix}{path}", {pure.name: data[path]})))
        elif suffix == ".zip" and not prefix:
            continue  # expanded by the caller
        else:
            what = "a .zip inside a .zip" if suffix == ".zip" else "a file that no uploaded WFDB header names"
            error = EcgInputError(
                f"{prefix}{path}: {what}; expected a WFDB header with its signal files, or an .edf, .bdf, "
                ".npy, .npz, .csv or .json file"
            )
            groups.append((position, RecordFiles(f"{prefix}{path}", {}, error)))
    return groups


def _is_record_file(path: str) -> bool:
    """Whether the file at ``path`` starts a record: a WFDB header or a single-file record (hidden files and
    macOS resource forks aside, as ``extract_zip`` leaves them out)."""
    parts = PurePosixPath(path).parts
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
        return False
    return PurePosixPath(path).suffix.lower() in (".hea", *SINGLE_FILE_SUFFIXES)


def record_labels(files: dict[str, bytes]) -> list[str]:
    """The records an upload holds, named as the results name them ('scan.zip:a/00001_hr.hea'), from the
    file names and the zips' listings alone: nothing is extracted or read."""
    labels = []
    for name, content in files.items():
        if name.lower().endswith(".zip"):
            labels += [f"{name}:{path}" for path in zip_member_names(content) if _is_record_file(path)]
        elif _is_record_file(name):
            labels.append(name)
    return labels


def one_record(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` when they hold at most one record; ``SeveralRecordsError`` naming them otherwise."""
    labels = record_labels(files)
    if len(labels) > 1:
        raise SeveralRecordsError(labels)
    return files


def split_records(
    files: dict[str, bytes], workdir: Path, max_members: int = MAX_ZIP_MEMBERS
) -> list[RecordFiles]:
    """One ``RecordFiles`` per record in ``files`` (name -> content, in upload order), zips (of at most
    ``max_members`` files each) expanded under ``workdir`` (an empty directory the caller removes). A zip
    that expands over the upload limit fails the whole request (``TooLargeError``): that limit is the
    request's."""
    order = list(files)
    placed: list[tuple[int, int, RecordFiles]] = [(p, 0, r) for p, r in _group(order, files, "")]
    for position, name in enumerate(order):
        if not name.lower().endswith(".zip"):
            continue
        try:
            root = Path(workdir) / f"zip{position}"
            paths = extract_zip(files[name], root, name, max_members=max_members)
            relative = [p.relative_to(root.resolve()).as_posix() for p in paths]
            data = {rel: path.read_bytes() for rel, path in zip(relative, paths, strict=True)}
            inner = _group(relative, data, f"{name}:")
            if not inner:
                raise EcgInputError(f"{name}: the archive holds no ECG record")
            placed.extend((position, sub, record) for sub, record in inner)
        except TooLargeError:
            raise
        except ClientError as exc:
            placed.append((position, 0, RecordFiles(name, {}, exc)))
    placed.sort(key=lambda entry: (entry[0], entry[1]))
    return [record for _, _, record in placed]


def request_limits(spec: InputSpec, windowing: Windowing) -> ReadLimits:
    """The limits of one inference request, from the settings: each record's duration, and the model
    windows of all its records together, counted as ``preprocess`` cuts them for ``spec`` and
    ``windowing``."""
    return ReadLimits.from_settings(partial(window_count, spec=spec, windowing=windowing))


def too_many_records(count: int, limit: int) -> ContentTooLargeError:
    return ContentTooLargeError(
        f"the upload holds {count} records; at most {limit} are taken a request (each record in a .zip "
        "counts): send them in several requests, or raise the limit with the setting ECGSSL_SERVE_MAX_RECORDS"
    )


def batch_records(files: dict[str, bytes], workdir: Path) -> list[RecordFiles]:
    """``split_records``, refusing an upload without any record (422) or with more records than
    ``ECGSSL_SERVE_MAX_RECORDS`` (413; records, not files: each record in a .zip counts, counted from the
    names before anything is extracted)."""
    limit = get_settings().serve_max_records
    if (count := len(record_labels(files))) > limit:
        raise too_many_records(count, limit)
    groups = split_records(files, workdir, max_members=max(MAX_ZIP_MEMBERS, ZIP_MEMBERS_PER_RECORD * limit))
    if not groups:
        raise ClientError(f"no ECG record in the upload ({', '.join(files)}): expected {ACCEPTED_UPLOADS}")
    if len(groups) > limit:
        raise too_many_records(len(groups), limit)
    return groups


def read_records(
    groups: list[RecordFiles],
    workdir: Path,
    fs: float | None,
    lead_names: list[str] | None,
    limits: ReadLimits,
) -> list[Recording | ClientError]:
    """Each record of ``groups`` read in turn under the request's ``limits`` (each in its own folder under
    ``workdir``): the recording, or its error in its place. Records over the request's windows end the
    request (``TooManyWindowsError``): that limit is the request's, not one record's."""
    recordings: list[Recording | ClientError] = []
    for index, group in enumerate(groups):
        if group.error is not None:
            recordings.append(group.error)
            continue
        folder = Path(workdir) / f"record{index}"
        folder.mkdir()
        try:
            recordings.append(read_upload(group.files, folder, fs=fs, lead_names=lead_names, limits=limits))
        except TooManyWindowsError:
            raise
        except ClientError as exc:
            recordings.append(exc)
    return recordings


@contextlib.contextmanager
def leased_record(
    served: ServedModel, upload: Upload, windowing: Windowing, timing: Timing
) -> Iterator[tuple[LoadedModel, Recording]]:
    """The one record of ``upload`` (``SeveralRecordsError`` when it holds more), read in mV under the
    request's limits (timed as the 'read' step), on a leased session of ``served`` in the upload's
    precision (a precision asked for that cannot be served is refused before the upload is read)."""
    files = one_record(upload.files)
    with SESSIONS.lease(served, upload.precision, strict=upload.precision is not None) as loaded:
        with timing.step("read"), tempfile.TemporaryDirectory(prefix="ecgssl-upload-") as workdir:
            limits = request_limits(served.spec, windowing)
            recording = read_upload(files, Path(workdir), upload.fs, upload.lead_names, limits)
        yield loaded, recording


def batch_recordings(
    served: ServedModel, upload: Upload, windowing: Windowing, timing: Timing
) -> tuple[list[RecordFiles], list[Recording | ClientError]]:
    """The records of ``upload`` (``batch_records``) and each one read under the request's limits (timed as
    the 'read' step), or its error in its place."""
    with timing.step("read"), tempfile.TemporaryDirectory(prefix="ecgssl-upload-") as workdir:
        groups = batch_records(upload.files, Path(workdir))
        limits = request_limits(served.spec, windowing)
        return groups, read_records(groups, Path(workdir), upload.fs, upload.lead_names, limits)


def read_one_record(served: ServedModel, upload: Upload, windowing: Windowing, timing: Timing) -> Recording:
    """The one record of ``upload`` read in mV under the request's limits for ``served`` (no session is
    leased: for looking at the signal, not running the model)."""
    files = one_record(upload.files)
    with timing.step("read"), tempfile.TemporaryDirectory(prefix="ecgssl-upload-") as workdir:
        limits = request_limits(served.spec, windowing)
        return read_upload(files, Path(workdir), upload.fs, upload.lead_names, limits)
