"""ST-MEM's RandAugment for fine-tuning (methods.md 1.1), applied to standardised training windows.

Each op takes a window x (C, L) float32 and a numpy Generator and returns a new array; ``level`` 0..10
scales its strength, level 10 (ST-MEM's setting) giving:

- ``shift``: shift left or right by U(0, 0.3) L samples, zero fill;
- ``cutout``: zero one contiguous span of U(0, 0.3) L samples in every lead;
- ``drop``: zero a random number (0 .. 0.3 L) of random time indices in every lead;
- ``flip``: negate the signal;
- ``erase``: zero one random lead;
- ``sine``: add 0.3 sin(2 pi t / 0.5), t in [0, 1) over the window (2 cycles per window);
- ``partial_sine``: that sine added on one random span of U(0, 0.3) L samples only;
- ``partial_white_noise``: 0.3 N(0, 1) added on one random span of U(0, 0.3) L samples.

``RandAugment`` draws ``num_layers`` (2) different ops per window and applies each with probability ``p``
(0.5). ``Augmented`` wraps a dataset of windows (or ``LabelledBatch`` items) and augments each item with a
generator seeded by (seed, epoch, index): reproducible, and new every epoch.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

MAX_FRACTION = 0.3  # span / shift as a fraction of the window at level 10
AMPLITUDE = 0.3  # added sine / noise amplitude at level 10 (the window is standardised: std 1)
SINE_PERIOD = 0.5  # in units of the window length: 2 cycles per window

Op = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]


def _span(length: int, rng: np.random.Generator, level: float) -> tuple[int, int]:
    """(start, stop) of a random span of U(0, 0.3 * level / 10) * length samples."""
    size = int(rng.uniform(0, MAX_FRACTION * level / 10) * length)
    start = int(rng.integers(0, length - size + 1))
    return start, start + size


def _sine(length: int) -> np.ndarray:
    t = np.arange(length) / length  # [0, 1)
    return np.sin(2 * np.pi * t / SINE_PERIOD).astype(np.float32)


def shift(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    length = x.shape[-1]
    n = int(rng.uniform(0, MAX_FRACTION * level / 10) * length) * int(rng.choice([-1, 1]))
    out = np.zeros_like(x)
    if n >= 0:
        out[:, n:] = x[:, : length - n]
    else:
        out[:, :n] = x[:, -n:]
    return out


def cutout(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    start, stop = _span(x.shape[-1], rng, level)
    out = x.copy()
    out[:, start:stop] = 0
    return out


def drop(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    length = x.shape[-1]
    count = int(rng.integers(0, int(MAX_FRACTION * level / 10 * length) + 1))
    out = x.copy()
    out[:, rng.choice(length, size=count, replace=False)] = 0
    return out


def flip(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    return -x


def erase(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    out = x.copy()
    out[int(rng.integers(0, x.shape[0]))] = 0
    return out


def sine(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    return x + AMPLITUDE * level / 10 * _sine(x.shape[-1])[None, :]


def partial_sine(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    start, stop = _span(x.shape[-1], rng, level)
    out = x.copy()
    out[:, start:stop] += AMPLITUDE * level / 10 * _sine(x.shape[-1])[start:stop]
    return out


def partial_white_noise(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
    start, stop = _span(x.shape[-1], rng, level)
    out = x.copy()
    noise = rng.standard_normal((x.shape[0], stop - start)).astype(np.float32)
    out[:, start:stop] += AMPLITUDE * level / 10 * noise
    return out


OPS: dict[str, Op] = {
    "shift": shift,
    "cutout": cutout,
    "drop": drop,
    "flip": flip,
    "erase": erase,
    "sine": sine,
    "partial_sine": partial_sine,
    "partial_white_noise": partial_white_noise,
}


class RandAugment:
    """``num_layers`` ops drawn without replacement per window, each applied with probability ``p``."""

    def __init__(
        self, ops: tuple[str, ...] = tuple(OPS), num_layers: int = 2, level: float = 10, p: float = 0.5
    ):
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment op(s) {unknown}: {', '.join(OPS)}")
        self.ops, self.num_layers, self.level, self.p = tuple(ops), num_layers, level, p

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x (C, L) -> augmented (C, L) float32."""
        for name in rng.choice(self.ops, size=min(self.num_layers, len(self.ops)), replace=False):
            if rng.random() < self.p:
                x = OPS[str(name)](x, rng, self.level)
        return np.asarray(x, dtype=np.float32)


class Augmented(Dataset):
    """Items of ``dataset`` (tensors (C, L), or named tuples whose first field is the signal) augmented."""

    def __init__(self, dataset: Dataset, augment: RandAugment, seed: int = 0):
        self.dataset, self.augment, self.seed = dataset, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):  # noqa: ANN204  (the wrapped dataset's item type)
        item = self.dataset[i]
        rng = np.random.default_rng([self.seed, self.epoch, i, 0xA0])
        signal = item[0] if isinstance(item, tuple) else item
        augmented = torch.from_numpy(self.augment(signal.numpy(), rng))
        return item._replace(**{item._fields[0]: augmented}) if isinstance(item, tuple) else augmented
