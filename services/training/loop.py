"""One training loop for every objective: the model's ``forward(batch)`` returns the loss.

AdamW with linear warmup then half-cycle cosine (per step), bf16 autocast on CUDA, checkpoints every
N epochs and at the end, resume from the last checkpoint, progress events, cancellation between steps.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from services.ecg.preprocess import standardise


class Cancelled(Exception):
    """Raised inside the loop when a cancel was requested."""


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 3.0
    min_lr: float = 0.0
    seed: int = 0
    checkpoint_every: int = 5
    num_workers: int = 0


@dataclass
class Progress:
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    lr: float
    samples_per_s: float
    eta_s: float


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0


class CropDataset(Dataset):
    """Prepared signals (N, C, T) (e.g. a cache memmap), rows ``indices`` -> standardised windows of
    ``window`` samples: a random crop to train, the centre crop to evaluate."""

    def __init__(
        self,
        signals: np.ndarray,
        window: int,
        random_crop: bool,
        seed: int = 0,
        indices: np.ndarray | None = None,
    ):
        self.signals = signals
        self.indices = np.arange(len(signals)) if indices is None else np.asarray(indices)
        self.window = window
        self.random_crop = random_crop
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        length = self.signals.shape[-1]
        start = (
            self.rng.integers(0, length - self.window + 1)
            if self.random_crop
            else (length - self.window) // 2
        )
        window = np.asarray(self.signals[self.indices[i], :, start : start + self.window], dtype=np.float32)
        return torch.from_numpy(standardise(window))


def lr_at(step: float, total: int, warmup: float, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * step / max(warmup, 1e-8)
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint_path: Path,
    val_set: Dataset | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    progress_interval_s: float = 1.0,
) -> TrainResult:
    """Train ``model`` (``model(batch) -> scalar loss``) and return the per-epoch history."""
    torch.manual_seed(cfg.seed)
    model.to(device)
    decay = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_set,
        batch_size=min(cfg.batch_size, len(train_set)),
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=cfg.num_workers,
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    result = TrainResult()
    start_epoch = 1
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        result.history = state["history"]
        start_epoch = state["epoch"] + 1
        result.resumed_from_epoch = state["epoch"]

    step = (start_epoch - 1) * steps_per_epoch
    last_report = 0.0
    run_started, run_start_step = time.perf_counter(), step
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        epoch_started, losses, seen = time.perf_counter(), [], 0
        for batch in loader:
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled at epoch {epoch}, step {step}")
            lr = lr_at(step, total_steps, warmup_steps, cfg.learning_rate, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch}, step {step}: lower the lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(batch)
            losses.append(loss.item())
            now = time.perf_counter()
            if on_progress is not None and (now - last_report >= progress_interval_s or step == total_steps):
                last_report = now
                rate = (step - run_start_step) / max(now - run_started, 1e-9)
                on_progress(
                    Progress(
                        epoch=epoch,
                        epochs=cfg.epochs,
                        step=step,
                        total_steps=total_steps,
                        loss=losses[-1],
                        lr=lr,
                        samples_per_s=seen / max(now - epoch_started, 1e-9),
                        eta_s=(total_steps - step) / max(rate, 1e-9),
                    )
                )
        metrics = {
            "train_loss": float(np.mean(losses)),
            "lr": lr,
            "samples_per_s": seen / max(time.perf_counter() - epoch_started, 1e-9),
        }
        if val_set is not None and len(val_set) > 0:
            metrics["val_loss"] = evaluate_loss(model, val_set, cfg.batch_size, device, seed=cfg.seed)
        result.history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            save_checkpoint(checkpoint_path, model, optimizer, generator, epoch, result.history)
    return result


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, seed: int
) -> float:
    """Mean objective on a dataset with a fixed RNG state, so epochs are comparable."""
    model.eval()
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed + 1)
    losses, weights = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        losses.append(model(batch.to(device)).item())
        weights.append(len(batch))
    torch.set_rng_state(rng_state)
    model.train()
    return float(np.average(losses, weights=weights))


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    history: list[dict[str, float]],
) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "epoch": epoch,
        "history": history,
    }
    torch.save(state, tmp)
    tmp.replace(path)
