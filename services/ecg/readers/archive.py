"""Zip archives read safely: the checks shared by .zip uploads and the .npz reader.

``safe_zip_members``/``extract_zip``: at most ``MAX_ZIP_MEMBERS`` members (a caller may allow more: a batch
of records); no absolute paths, drive letters, ``..`` components, symbolic links or other special files, no
encrypted or duplicate members; the declared uncompressed sizes together must stay within the upload limit
and no member over ``RATIO_CHECK_MIN_BYTES`` may expand more than ``MAX_COMPRESSION_RATIO``-fold; while
extracting, the real bytes are counted and extraction stops as soon as they exceed the declared size or the
limit. Members are written only below the given directory, each to a path checked to resolve inside it,
never overwriting. ``zip_member_names`` lists the members without extracting anything.
"""

import io
import re
import stat
import zipfile
import zlib
from pathlib import Path

from services.config import get_settings
from services.ecg.recording import ContentTooLargeError
from services.errors import EcgInputError

MAX_ZIP_MEMBERS = 64


MAX_COMPRESSION_RATIO = 100


RATIO_CHECK_MIN_BYTES = 1024 * 1024  # small members may compress well (headers, padding) and are harmless


_CHUNK = 64 * 1024


def upload_limit() -> int:
    return get_settings().upload_max_bytes


def safe_zip_members(
    archive: zipfile.ZipFile, source: str, limit: int, max_members: int = MAX_ZIP_MEMBERS
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The regular-file members worth reading, as (info, path parts), after the safety checks (see top)."""
    infos = archive.infolist()
    if len(infos) > max_members:
        raise EcgInputError(f"{source}: {len(infos)} members in the archive; at most {max_members} accepted")
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


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    buffer = io.BytesIO()
    _copy_member(archive, info, buffer, source, upload_limit())
    return buffer.getvalue()


def extract_zip(
    data: bytes, dest: Path, source: str, limit: int | None = None, max_members: int = MAX_ZIP_MEMBERS
) -> list[Path]:
    """Safely extract a .zip upload into the new directory ``dest``; the extracted files' paths."""
    limit = upload_limit() if limit is None else limit
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise EcgInputError(f"{source}: not a valid .zip archive ({exc})") from None
    paths = []
    with archive:
        members = safe_zip_members(archive, source, limit, max_members)
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


def zip_member_names(data: bytes) -> list[str]:
    """The file members' paths of a .zip ('/'-separated), from its central directory alone: nothing is
    decompressed or written. [] for data that is no readable .zip (``extract_zip`` says why)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [info.filename.replace("\\", "/") for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError):
        return []
