"""Records stored as arrays in one ``.npz`` file.

Arrays: ``signals`` (N, leads, samples), any float dtype (integers are accepted too; values are taken as
mV, or as stored when the file holds normalised signals); optional ``fs`` (scalar, Hz; default 250),
``lead_names`` (leads,) (default the 12 standard leads when there are 12 rows), ``ecg_id`` or
``record_ids`` (N,), ``labels`` (N, K) 0/1 with ``label_names`` (K,), ``folds`` (N,) ints.

Loading: numpy cannot memory-map a member of an ``.npz`` (``np.load(..., mmap_mode="r")`` ignores the
mode for archives). A member written uncompressed (``np.savez``, and the synthetic kind's cache) lies
contiguously in the file, so ``signals`` is memory-mapped at its offset: opening costs nothing and a
record reads only its own bytes. A compressed member (``np.savez_compressed``, e.g.
``ptbxl_unlabelled_250hz.npz``) cannot be mapped; it is decompressed once, on the first record read
(not when the dataset is opened or summarised), and kept in memory. Shape and dtype are read from the
member's ``.npy`` header, so opening and ``summary()`` never decompress the signals.
"""

import struct
import zipfile
from pathlib import Path

import numpy as np

from services.datasets.base import EcgDataset
from services.datasets.wfdb_folder import build_summary
from services.ecg.leads import STANDARD_LEADS
from services.ecg.recording import Recording
from services.errors import DatasetError

_SMALL = ("fs", "lead_names", "ecg_id", "record_ids", "labels", "label_names", "folds")


def npz_file(path: Path) -> Path:
    """The ``.npz`` itself, or the one ``.npz`` directly inside a folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(f"'{path.name}' is not a .npz file")
        return path
    if path.is_dir():
        found = sorted(p for p in path.glob("*.npz") if p.is_file())
        if len(found) != 1:
            raise DatasetError(
                f"'{path.name}': expected exactly one .npz file in the folder, found {len(found)}"
                + (f" ({', '.join(p.name for p in found[:5])})" if found else "")
            )
        return found[0]
    raise DatasetError(f"'{path.name}' does not exist")


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype]:
    with archive.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        return np.lib.format.read_array_header_2_0(fp)


def _memmap_member(file: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """The member as a read-only memmap when it is stored uncompressed, else None."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(file, "rb") as fp:
        fp.seek(info.header_offset)
        local = fp.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        fp.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(fp)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(fp)
        offset = fp.tell()
    if dtype.hasobject:
        return None
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class NpzDataset(EcgDataset):
    """Records of one ``.npz`` (see the module docstring for the arrays and how they are loaded)."""

    kind = "npz"

    def __init__(self, path: Path):
        self.file = npz_file(path)
        try:
            archive = zipfile.ZipFile(self.file)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"{self.file.name}: not a readable .npz archive ({exc})") from exc
        with archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            if "signals" not in members:
                raise DatasetError(
                    f"{self.file.name}: expected an array named 'signals' (records, leads, samples); "
                    f"found {', '.join(members) or 'none'}"
                )
            self._signals_info = members["signals"]
            try:
                shape, _, dtype = _member_header(archive, self._signals_info)
            except ValueError as exc:
                raise DatasetError(f"{self.file.name}: 'signals' is not a .npy array ({exc})") from exc
        if len(shape) != 3 or not all(shape):
            raise DatasetError(f"{self.file.name}: 'signals' must be (records, leads, samples), got {shape}")
        if dtype.kind not in "fiu":
            raise DatasetError(f"{self.file.name}: 'signals' must hold numbers, got dtype {dtype}")
        self.shape: tuple[int, int, int] = shape
        n, leads, _ = shape
        small = self._load_small(set(members) & set(_SMALL))
        self.fs = self._fs(small.get("fs"))
        self.lead_names = self._lead_names(small.get("lead_names"), leads)
        self.record_ids = self._record_ids(small, n)
        self.labels, self.label_names = self._labels(small.get("labels"), small.get("label_names"), n)
        self.folds = self._per_record_ints(small.get("folds"), "folds", n)
        self._signals: np.ndarray | None = None

    def _load_small(self, names: set[str]) -> dict[str, np.ndarray]:
        try:
            with np.load(self.file, allow_pickle=False) as arrays:
                return {name: arrays[name] for name in names}
        except ValueError as exc:  # object arrays
            raise DatasetError(f"{self.file.name}: arrays must not hold Python objects ({exc})") from exc

    def _fs(self, value: np.ndarray | None) -> float:
        if value is None:
            return 250.0
        if value.size != 1 or value.dtype.kind not in "fiu" or not float(value.reshape(-1)[0]) > 0:
            raise DatasetError(f"{self.file.name}: 'fs' must be one positive number (Hz), got {value!r}")
        return float(value.reshape(-1)[0])

    def _lead_names(self, value: np.ndarray | None, leads: int) -> list[str]:
        if value is None:
            if leads == len(STANDARD_LEADS):
                return list(STANDARD_LEADS)
            raise DatasetError(
                f"{self.file.name}: 'signals' has {leads} leads; without an array 'lead_names' only 12 "
                "leads (standard order I, II, III, aVR, aVL, aVF, V1-V6) are understood"
            )
        names = [str(v) for v in value.reshape(-1).tolist()]
        if len(names) != leads:
            raise DatasetError(f"{self.file.name}: {len(names)} 'lead_names' for {leads} leads in 'signals'")
        return names

    def _record_ids(self, small: dict[str, np.ndarray], n: int) -> list[str]:
        for name in ("record_ids", "ecg_id"):
            if name in small:
                ids = small[name].reshape(-1)
                if len(ids) != n:
                    raise DatasetError(f"{self.file.name}: '{name}' has {len(ids)} entries for {n} records")
                return [str(v) for v in ids.tolist()]
        return [str(i) for i in range(n)]

    def _per_record_ints(self, value: np.ndarray | None, name: str, n: int) -> np.ndarray | None:
        if value is None:
            return None
        if value.shape != (n,) or value.dtype.kind not in "iu":
            raise DatasetError(
                f"{self.file.name}: '{name}' must be integers shaped ({n},), got {value.dtype} {value.shape}"
            )
        return value.astype(np.int64)

    def _labels(
        self, labels: np.ndarray | None, names: np.ndarray | None, n: int
    ) -> tuple[np.ndarray | None, tuple[str, ...]]:
        if labels is None:
            if names is not None:
                raise DatasetError(f"{self.file.name}: 'label_names' given without 'labels'")
            return None, ()
        if labels.ndim != 2 or labels.shape[0] != n or labels.dtype.kind not in "fiub":
            raise DatasetError(
                f"{self.file.name}: 'labels' must be multi-hot (records, classes) = ({n}, K), "
                f"got {labels.dtype} {labels.shape}"
            )
        if not np.isin(labels, (0, 1)).all():
            raise DatasetError(f"{self.file.name}: 'labels' must hold only 0 and 1")
        if names is None or names.reshape(-1).shape[0] != labels.shape[1]:
            raise DatasetError(
                f"{self.file.name}: 'labels' has {labels.shape[1]} classes; give their names as an "
                f"array 'label_names' of {labels.shape[1]} strings"
            )
        return labels.astype(np.float32), tuple(str(v) for v in names.reshape(-1).tolist())

    @property
    def signals(self) -> np.ndarray:
        """All signals: memory-mapped when the member is stored, else decompressed once (first use)."""
        if self._signals is None:
            mapped = _memmap_member(self.file, self._signals_info)
            if mapped is None:
                with np.load(self.file, allow_pickle=False) as arrays:
                    mapped = arrays["signals"]
            if mapped.shape != self.shape:
                raise DatasetError(f"{self.file.name}: 'signals' changed on disk since it was opened")
            self._signals = mapped
        return self._signals

    @property
    def memory_mapped(self) -> bool:
        return isinstance(self.signals, np.memmap)

    def __len__(self) -> int:
        return self.shape[0]

    def record_id(self, index: int) -> str:
        return self.record_ids[index]

    def recording(self, index: int) -> Recording:
        signal = np.array(self.signals[index], dtype=np.float32)  # a copy, never a view of the map
        return Recording(signal, self.fs, list(self.lead_names), f"{self.file.name}:{self.record_ids[index]}")

    def summary(self) -> dict:
        n, _, samples = self.shape
        return build_summary(
            n,
            [self.fs] * n if n else [],
            [self.lead_names],
            [samples / self.fs],
            self.labels,
            self.label_names,
            self.folds,
        )
