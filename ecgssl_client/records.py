"""Find the ECG records in files, folders and zip archives, and cut them into upload batches.

A record is what the API reads as one ECG: a WFDB header (``.hea``) with the signal files it names (and the
files sharing its stem beside it, as the server groups them), or one self-contained file (``.edf``,
``.bdf``, ``.npy``, ``.npz``, ``.csv``, ``.tsv``, ``.json``). Zip archives are opened here, so that each of
their records is uploaded, counted and answered on its own.
"""

import zipfile
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

SINGLE_FILE_SUFFIXES = (".edf", ".bdf", ".npy", ".npz", ".csv", ".tsv", ".json")
TABLE_SUFFIXES = (".csv", ".tsv", ".json")  # beside WFDB records these are metadata, not ECGs
ACCEPTED = "a WFDB header (.hea) with its signal files, .edf, .bdf, .npy, .npz, .csv, .tsv, .json, or a .zip"


class RecordError(ValueError):
    """A path given on the command line holds no ECG record, or cannot be read."""


@dataclass
class Record:
    """One ECG record: its id (how outputs name it) and its files (upload name -> reader of the bytes)."""

    id: str
    files: dict[str, Callable[[], bytes]]
    size: int  # bytes of its files together

    def read(self) -> list[tuple[str, bytes]]:
        return [(name, read()) for name, read in self.files.items()]


@dataclass
class _Tree:
    """Files of a folder or an archive: posix relative path -> (size, reader)."""

    entries: dict[str, tuple[int, Callable[[], bytes]]] = field(default_factory=dict)


def header_signal_files(text: str) -> list[str]:
    """The signal file names a WFDB header lists (the first column of its signal lines)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        return []
    fields = lines[0].split()
    try:
        n_signals = int(fields[1]) if len(fields) > 1 else 0
    except ValueError:
        return []
    names: list[str] = []
    for line in lines[1 : 1 + n_signals]:
        name = line.split()[0]
        if name != "~" and name not in names:
            names.append(name)
    return names


def _records_of_tree(tree: _Tree, prefix: str, only: set[str] | None = None) -> list[Record]:
    """The records of ``tree``, in path order; ``only``: the header or file paths asked for (files given
    one by one), else every record (tables beside WFDB headers are left out as metadata)."""
    paths = sorted(tree.entries)
    has_wfdb = any(p.lower().endswith(".hea") for p in paths)
    by_folder: dict[PurePosixPath, list[str]] = {}
    for path in paths:
        by_folder.setdefault(PurePosixPath(path).parent, []).append(path)
    records: list[Record] = []
    for path in paths:
        pure = PurePosixPath(path)
        suffix = pure.suffix.lower()
        if only is not None and path not in only:
            continue
        size, read = tree.entries[path]
        if suffix == ".hea":
            named = set(header_signal_files(read().decode("latin-1")))
            files = {pure.name: read}
            total = size
            for other in by_folder[pure.parent]:
                candidate = PurePosixPath(other)
                if other == path:
                    continue
                same_stem = candidate.stem == pure.stem and candidate.suffix.lower() not in (
                    ".hea",
                    ".zip",
                    *SINGLE_FILE_SUFFIXES,
                )
                if candidate.name in named or same_stem:
                    other_size, other_read = tree.entries[other]
                    files[candidate.name] = other_read
                    total += other_size
            records.append(Record(f"{prefix}{pure.with_suffix('')}", files, total))
        elif suffix in SINGLE_FILE_SUFFIXES and (
            only is not None or not (has_wfdb and suffix in TABLE_SUFFIXES)
        ):
            records.append(Record(f"{prefix}{pure.with_suffix('')}", {pure.name: read}, size))
    return records


def _folder_tree(folder: Path) -> _Tree:
    tree = _Tree()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            tree.entries[path.relative_to(folder).as_posix()] = (path.stat().st_size, path.read_bytes)
    return tree


def _zip_tree(archive: Path) -> _Tree:
    try:
        with zipfile.ZipFile(archive) as opened:
            infos = [
                i for i in opened.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")
            ]
    except (zipfile.BadZipFile, OSError) as exc:
        raise RecordError(f"{archive}: not a readable zip archive ({exc})") from exc
    tree = _Tree()
    for info in infos:

        def read(member: str = info.filename) -> bytes:
            with zipfile.ZipFile(archive) as opened:
                return opened.read(member)

        tree.entries[info.filename] = (info.file_size, read)
    return tree


def find_records(paths: Iterable[str | Path]) -> list[Record]:
    """The records in ``paths``, in the order given (a folder's and an archive's in path order).

    Ids: a folder's records by their path inside it without the suffix (``00000/00001_hr``), an archive's
    prefixed with its name (``ecgs.zip:00001_hr``; a zip in a folder: its path in the folder), a file's by
    its name without the suffix. A ``.hea``
    named directly takes its signal files from its folder; a signal file named beside its header is taken
    with it. Raises ``RecordError`` for a path that holds no record, or two records with one id."""
    records: list[Record] = []
    given = [Path(p) for p in paths]
    headers_given = {p.with_suffix(".hea").resolve() for p in given if p.suffix.lower() == ".hea"}
    folders: dict[Path, _Tree] = {}  # files given one by one: their folder listed once
    for path in given:
        if path.is_dir():
            tree = _folder_tree(path)
            found = _records_of_tree(tree, "")
            for inner in (p for p in tree.entries if p.lower().endswith(".zip")):  # zips in the folder
                found.extend(_records_of_tree(_zip_tree(path / inner), f"{inner}:"))
        elif not path.exists():
            raise RecordError(f"{path}: no such file or folder")
        elif path.suffix.lower() == ".zip":
            found = _records_of_tree(_zip_tree(path), f"{path.name}:")
        elif path.suffix.lower() == ".hea" or path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            if path.parent not in folders:
                folders[path.parent] = _folder_tree_of(path)
            found = _records_of_tree(folders[path.parent], "", only={path.name})
        elif path.with_suffix(".hea").resolve() in headers_given:
            continue  # a signal file given beside its header: the header takes it
        else:
            raise RecordError(f"{path}: not an ECG record; expected {ACCEPTED}")
        if not found:
            raise RecordError(f"{path}: holds no ECG record; expected {ACCEPTED}")
        records.extend(found)
    seen: dict[str, Record] = {}
    for record in records:
        if record.id in seen:
            raise RecordError(
                f"two records have the id '{record.id}': give their folders in separate runs, or their parent"
            )
        seen[record.id] = record
    return records


def _folder_tree_of(path: Path) -> _Tree:
    """The files of ``path``'s folder (not below it): a header's signal files are beside it."""
    tree = _Tree()
    for sibling in sorted(path.parent.iterdir()):
        if sibling.is_file():
            tree.entries[sibling.name] = (sibling.stat().st_size, sibling.read_bytes)
    return tree


def take_batch(pending: deque[Record], max_records: int, max_bytes: int) -> list[Record]:
    """Take the next batch off ``pending``: at most ``max_records`` records and ``max_bytes`` bytes (a larger
    record goes alone), no two files sharing a name (the API keys uploads by file name)."""
    batch: list[Record] = []
    names: set[str] = set()
    size = 0
    while pending:
        record = pending[0]
        clash = not names.isdisjoint(record.files)
        if batch and (len(batch) >= max_records or size + record.size > max_bytes or clash):
            break
        batch.append(pending.popleft())
        names.update(record.files)
        size += record.size
    return batch
