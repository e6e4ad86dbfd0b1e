"""Synthetic 12-lead ECGs from the pretrained Pulse2Pulse GAN of the ``deepfake-ecg`` package (1.1.2, MIT).

Thambawita et al., Sci Rep 11, 21896 (2021), doi:10.1038/s41598-021-01295-2. The GAN was trained on
normal 10 s ECGs at 500 Hz; it outputs leads I, II, V1-V6 in tanh range, which the package multiplies by
6000 and writes as integers. That unit is microvolts: the package's README does not say, but its later
upstream source (github.com/vlbthambawita/deepfake-ecg, ``dataToPDF``) divides the same scaled output by
1000 "from µV to mV" to plot it at 1 mV/10 mm, and read as µV the ECGs have normal amplitudes: over 200
generated ECGs the lead II R wave (99.9th percentile above the median) has quartiles 0.74/0.94/1.08 mV
against 0.71/0.94/1.22 mV for 200 real PTB-XL NORM records, median heart rate 67 bpm in both. So here
mV = tanh output * 6000 / 1000.

The package's own ``generate()`` writes text files from unseeded noise; instead the Generator and its
weights are loaded here and fed seeded noise, so a (n, seed) pair always gives the same ECGs. Record i
gets its own noise generator (seeded from (seed, i)), runs on the CPU in batches, and III, aVR, aVL, aVF
are derived from I and II (Einthoven/Goldberger) to give the 12 standard leads. The result is cached as
an uncompressed ``.npz`` (a valid ``npz`` dataset itself) under ``<artifact_dir>/datasets/``, written
atomically and streamed batch by batch, and memory-mapped when read. Nothing is generated before a
record is read (opening and summarising are free), so a second dataset over the same (n, seed) only maps
the cache. torch and deepfakeecg are imported only when ECGs are generated.
"""

import os
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from services.config import get_settings
from services.datasets.base import EcgDataset
from services.datasets.npz import NpzDataset
from services.datasets.wfdb_folder import build_summary
from services.ecg.leads import STANDARD_LEADS
from services.ecg.recording import Recording
from services.errors import DatasetError

MAX_RECORDS = 10_000
FS = 500
SAMPLES = 5000  # 10 s
PACKAGE_SCALE = 6000.0  # the package's factor from the tanh output to its integer unit (µV)
UV_PER_MV = 1000.0
GENERATED_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
BATCH = 32

ProgressFn = Callable[[int, int], None]


def cache_path(n: int, seed: int) -> Path:
    return Path(get_settings().artifact_dir) / "datasets" / f"synthetic-n{n}-seed{seed}.npz"


def twelve_leads(eight: np.ndarray) -> np.ndarray:
    """(..., 8, T) leads I, II, V1-V6 -> (..., 12, T) in the standard order, limb leads derived."""
    lead_i, lead_ii = eight[..., 0, :], eight[..., 1, :]
    derived = (
        lead_ii - lead_i,  # III
        -(lead_i + lead_ii) / 2,  # aVR
        lead_i - lead_ii / 2,  # aVL
        lead_ii - lead_i / 2,  # aVF
    )
    return np.concatenate([eight[..., :2, :], np.stack(derived, axis=-2), eight[..., 2:, :]], axis=-2)


def _record_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generate(n: int, seed: int, batch: int = BATCH) -> Iterator[np.ndarray]:
    """Yield batches of (b, 12, 5000) float32 ECGs in mV, n in all, deterministic for (n, seed)."""
    import torch  # heavy: imported only where ECGs are generated

    try:
        import deepfakeecg
        from deepfakeecg.models import Generator
    except ImportError as exc:
        raise DatasetError(
            "the synthetic dataset needs the 'deepfake-ecg' package (pip install deepfake-ecg==1.1.2)"
        ) from exc
    weights = Path(deepfakeecg.__file__).parent / "checkpoints" / "g_stat.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its __init__ calls nn.init.kaiming_normal
        model = Generator()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state["stat_dict"])
    model.eval()
    for start in range(0, n, batch):
        noise = torch.stack(
            [
                torch.empty(len(GENERATED_LEADS), SAMPLES).uniform_(
                    -1, 1, generator=torch.Generator().manual_seed(_record_seed(seed, i))
                )
                for i in range(start, min(start + batch, n))
            ]
        )
        with torch.inference_mode():
            out = model(noise).numpy()
        mv = (out * np.float32(PACKAGE_SCALE / UV_PER_MV)).astype(np.float32)
        yield twelve_leads(mv)


def write_cache(path: Path, n: int, seed: int, on_progress: ProgressFn | None = None) -> None:
    """Generate and write the cache file atomically (temporary file + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    small = {
        "fs": np.float64(FS),
        "lead_names": np.array(STANDARD_LEADS),
        "record_ids": np.array([str(i) for i in range(n)]),
        "source": np.array(f"deepfake-ecg 1.1.2 Pulse2Pulse, n={n}, seed={seed}, mV"),
    }
    shape = (n, len(STANDARD_LEADS), SAMPLES)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in small.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as fp:
                    np.lib.format.write_array(fp, value, allow_pickle=False)
            with archive.open("signals.npy", "w", force_zip64=True) as fp:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(fp, {**header, "shape": shape})
                done = 0
                for chunk in generate(n, seed):
                    fp.write(np.ascontiguousarray(chunk, dtype=np.float32).tobytes())
                    done += len(chunk)
                    if on_progress:
                        on_progress(done, n)
            if done != n:
                raise RuntimeError(f"generated {done} ECGs instead of {n}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class SyntheticDataset(EcgDataset):
    """``n`` (1..10000) synthetic 10 s 12-lead ECGs at 500 Hz in mV for a ``seed``; unlabelled.

    Opening and ``summary()`` cost nothing and import no torch (the API registers datasets): the
    ECGs are generated, or read from the cache, on first access to a record or to ``signals``, or
    by ``materialise()`` (which a worker can call with a progress callback). ``from_cache`` is None
    until then, afterwards whether the cache file was already there.
    """

    kind = "synthetic"

    def __init__(self, n: int, seed: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_RECORDS:
            raise DatasetError(f"option 'n' must be an integer from 1 to {MAX_RECORDS}, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DatasetError(f"option 'seed' must be a non-negative integer, got {seed!r}")
        self.n, self.seed = n, seed
        self.path = cache_path(n, seed)
        self.from_cache: bool | None = None
        self._arrays: NpzDataset | None = None

    def materialise(self, on_progress: ProgressFn | None = None) -> NpzDataset:
        """The generated ECGs as an (uncompressed, memory-mapped) npz dataset; generated if not cached."""
        if self._arrays is None:
            self.from_cache = self.path.is_file() and self._valid()
            if not self.from_cache:
                write_cache(self.path, self.n, self.seed, on_progress)
            self._arrays = NpzDataset(self.path)
        return self._arrays

    def _valid(self) -> bool:
        try:
            return NpzDataset(self.path).shape == (self.n, len(STANDARD_LEADS), SAMPLES)
        except DatasetError:
            return False

    @property
    def signals(self) -> np.ndarray:
        """(n, 12, 5000) float32 mV, memory-mapped from the cache."""
        return self.materialise().signals

    def __len__(self) -> int:
        return self.n

    def record_id(self, index: int) -> str:
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} of {self.n}")
        return str(index)

    def recording(self, index: int) -> Recording:
        rec = self.materialise().recording(index)
        rec.source = f"synthetic-n{self.n}-seed{self.seed}:{index}"
        return rec

    def summary(self) -> dict:
        return build_summary(self.n, [FS] * self.n, [STANDARD_LEADS], [SAMPLES / FS], None, (), None)
