"""Preprocessed-cache benchmark: records/s to build it, samples/s to read it in training.

Reads are compared, in the same run, with what training would do without the cache: read each
WFDB record and run the preprocessing for every sample it draws. And reading one record for the cache
(``prepare_signal(read_wfdb(...))``: header, signal, resampling to the model rate, band-pass) is timed
side by side with the same written plainly: ``wfdb.rdrecord`` + ``scipy.signal.resample_poly`` +
``sosfiltfilt`` (interleaved repeats, medians; ``--clock thread`` on a CPU shared with other work).

    .venv/bin/python bench/cache_throughput.py [--records 200] [--batch 32] [--clock wall|thread]
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.signal as sps
import torch
import wfdb
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.datasets.cache import preprocessed  # noqa: E402
from services.datasets.ptbxl import PtbxlDataset  # noqa: E402
from services.ecg.preprocess import InputSpec, _bandpass_sos, prepare_signal, standardise  # noqa: E402
from services.ecg.readers import read_wfdb  # noqa: E402
from services.training.loop import CropDataset  # noqa: E402


class OnTheFly(Dataset):
    """No cache: read and preprocess the record for every sample."""

    def __init__(self, dataset: PtbxlDataset, indices: np.ndarray, spec: InputSpec):
        self.dataset, self.indices, self.spec = dataset, indices, spec
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = prepare_signal(self.dataset.recording(int(self.indices[i])), self.spec)
        start = self.rng.integers(0, x.shape[1] - self.spec.samples + 1)
        return torch.from_numpy(standardise(x[:, start : start + self.spec.samples]))


def samples_per_s(dataset: Dataset, batch: int, epochs: int) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    started, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for x in loader:
            seen += len(x)
    return seen / (time.perf_counter() - started)


def plain_read(header: Path, spec: InputSpec) -> np.ndarray:
    """(12, T) float32 at ``spec.fs``, band-passed: the plain version of ``prepare_signal(read_wfdb(h))``
    for a PTB-XL record (12 leads in the model's order, mV)."""
    record = wfdb.rdrecord(str(header.with_suffix("")))
    ratio = Fraction(spec.fs / record.fs).limit_denominator(1000)
    x = sps.resample_poly(record.p_signal.T, ratio.numerator, ratio.denominator, axis=-1, padtype="line")
    sos = _bandpass_sos(spec.fs, spec.highpass_hz, spec.lowpass_hz, spec.filter_order)
    return sps.sosfiltfilt(sos, x, axis=-1).astype(np.float32)


def read_ratio(headers: list[Path], spec: InputSpec, repeats: int, clock) -> tuple[float, float]:
    """Median ms per record, ours and plain, over ``repeats`` interleaved passes over ``headers``."""
    contenders = {
        "ours": lambda h: prepare_signal(read_wfdb(h), spec),
        "plain": lambda h: plain_read(h, spec),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats):
        for name in list(contenders)[r % 2 :] + list(contenders)[: r % 2]:  # alternate who goes first
            started = clock()
            for h in headers:
                contenders[name](h)
            times[name].append((clock() - started) / len(headers) * 1e3)
    return statistics.median(times["ours"]), statistics.median(times["plain"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ptbxl-500"))
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the cache when reading")
    parser.add_argument("--read-repeats", type=int, default=7, help="passes of the record-read comparison")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = parser.parse_args()

    dataset = PtbxlDataset(Path(args.data))
    indices = np.arange(min(args.records, len(dataset)))
    spec = InputSpec()
    root = Path(tempfile.mkdtemp(prefix="ecgssl-bench-cache-"))
    try:
        started = time.perf_counter()
        cache = preprocessed(dataset, {"bench": args.data}, spec, root, indices=indices)
        build_s = time.perf_counter() - started
        reopened_s = time.perf_counter()
        preprocessed(dataset, {"bench": args.data}, spec, root, indices=indices)
        reopened_s = time.perf_counter() - reopened_s

        cached = samples_per_s(
            CropDataset(cache.signals, spec.samples, random_crop=True), args.batch, args.epochs
        )
        on_the_fly = samples_per_s(OnTheFly(dataset, indices, spec), args.batch, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"PTB-XL 500 Hz, {len(indices)} records -> {cache.signals.shape} float32 at {spec.fs:g} Hz")
    rate = len(indices) / build_s
    print(f"build:  {rate:8.1f} records/s ({build_s:.2f} s); reopen {reopened_s * 1000:.1f} ms")
    print(f"read:   cache {cached:10.1f} samples/s | on the fly {on_the_fly:8.1f} samples/s")
    print(f"ratio cache / on the fly: {cached / on_the_fly:.1f}x")

    headers = [dataset.header_path(int(i)) for i in indices]
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    ours_ms, plain_ms = read_ratio(headers, spec, args.read_repeats, clock)
    print(
        f"read a record for the cache ({len(headers)} records, {args.read_repeats} interleaved passes, "
        f"{args.clock} clock, medians): ours {ours_ms:.2f} ms, plain rdrecord + resample_poly + sosfiltfilt "
        f"{plain_ms:.2f} ms; ratio ours/plain speed {plain_ms / ours_ms:.2f}x"
    )


if __name__ == "__main__":
    main()
