"""One training loop for every objective: the model's ``forward(batch)`` returns the loss.

AdamW with linear warmup then half-cycle cosine (per step); mixed precision on CUDA (bf16 autocast, or
fp16 with a gradient scaler where bf16 is missing); optional ``torch.compile``; data parallelism when
launched with torchrun (``services.training.distributed``); checkpoints every N epochs and at the end,
resume from the last checkpoint, progress events, cancellation between steps.

Two optional hooks on the model (the plain module, never its compiled or DDP wrapper):
- ``model.param_groups(weight_decay) -> list[dict]``: the AdamW parameter groups (e.g. no decay on biases
  and norms; a group's ``lr_scale`` multiplies the scheduled lr, e.g. layer-wise lr decay); without it,
  one group of every trainable parameter with ``cfg.weight_decay``;
- ``model.after_step(step, total_steps)``: called after every optimiser step (``step`` the 0-based index of
  that step), e.g. to update an EMA target network. Whatever it changes must live in the model's
  ``state_dict`` (parameters or buffers), so that a checkpoint resumes it.
"""

import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from services.ecg.preprocess import standardise
from services.training import distributed
from services.training.distributed import DistContext

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests use "aot_eager" (no C++ compile)


class Cancelled(Exception):
    """Raised inside the loop when a cancel was requested."""


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int  # the global batch: split evenly between the processes of a torchrun launch
    learning_rate: float
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 3.0
    min_lr: float = 0.0
    seed: int = 0
    checkpoint_every: int = 5
    num_workers: int = 0
    amp: bool = True  # autocast: bf16 (CUDA without bf16: fp16 + GradScaler; CPU without bf16: fp32)
    compile: bool = False  # torch.compile the model; falls back to eager (with a warning) if that fails


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
    ``window`` samples: a random crop to train, the centre crop to evaluate.

    The random crop of a row is a function of (seed, epoch, row) (``set_epoch`` is called by the loop
    each epoch): a new crop every epoch, and the same crop whichever process or DataLoader worker
    loads the row, in whatever order.
    """

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
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        length = self.signals.shape[-1]
        row = int(self.indices[i])
        if self.random_crop:
            rng = np.random.default_rng([self.seed, self.epoch, row])
            start = int(rng.integers(0, length - self.window + 1))
        else:
            start = (length - self.window) // 2
        window = np.asarray(self.signals[row, :, start : start + self.window], dtype=np.float32)
        return torch.from_numpy(standardise(window))


class CropConcat(ConcatDataset):
    """Several ``CropDataset``s as one (e.g. the caches of a job's datasets): a global index runs over
    the first's rows, then the second's, ...; ``set_epoch`` reaches them all."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


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


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: without ``amp``, fp32 everywhere. With it, on CUDA bf16
    where supported, else fp16 (with a gradient scaler); on a CPU with native bf16 arithmetic (AVX512-BF16
    or AMX) bf16, elsewhere fp32 (emulated bf16 would only be slower).

    On the development machine's 2-core AMD EPYC (AVX512-BF16) bf16 autocast makes ST-MEM pretraining
    about 3x faster than fp32 (``bench/pretrain_throughput.py --amp on/off``).
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description() -> str:
    """What a figure was measured on, as reports and benchmarks print it: the CPU, its logical CPUs and
    whether it has native bf16. That last decides whether autocasting families train in bf16 or fp32
    (``amp_dtype``), so the same pretraining recipe gives a different encoder on CPUs that differ in it."""
    bf16 = "native bf16: autocast trains in bf16" if cpu_has_native_bf16() else "no native bf16: fp32"
    return f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} logical CPUs, {bf16}"


class TrainStep:
    """One optimisation step as ``train`` runs it: autocast, compile, DDP, AdamW, gradient scaler.

    ``model`` stays the plain module (its ``state_dict`` is what checkpoints hold); what the forward
    runs through (compiled and/or DDP-wrapped) is built at the first step.
    """

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, device: torch.device, ctx: DistContext | None = None
    ):
        self.model = model
        self.device = device
        self.ctx = ctx or DistContext(device=device)
        self.compile = cfg.compile
        self.dtype = amp_dtype(device, cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = model.param_groups(cfg.weight_decay) if hasattr(model, "param_groups") else params
        self.optimizer = torch.optim.AdamW(
            groups,  # default (ST-MEM): decay on all, as the original
            lr=cfg.learning_rate,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            fused=_fused_ok(params),
        )
        self.forward_module: nn.Module | None = None
        self.compiled = False

    def describe(self) -> str:
        precision = {
            None: "fp32",
            torch.bfloat16: "bf16 autocast",
            torch.float16: "fp16 autocast + GradScaler",
        }
        parts = [precision[self.dtype], "torch.compile" if self.compiled else "eager"]
        if self.ctx.enabled:
            parts.append(f"DDP x{self.ctx.world_size}")
        return ", ".join(parts)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.forward_module is None:
            self.forward_module = self._build(batch)
        with self.autocast():
            return self.forward_module(batch)

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(self, batch: torch.Tensor) -> float:
        """forward, backward, step; the loss (mean over the ranks)."""
        loss = self.forward(batch)
        value = self.ctx.mean(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value}: lower the lr")
        self.update(loss)
        return value

    def _build(self, batch: torch.Tensor) -> nn.Module:
        module = self.model
        if self.compile:
            module = self._compiled_or_eager(batch)
        return self.ctx.wrap(module)

    def _compiled_or_eager(self, batch: torch.Tensor) -> nn.Module:
        """``torch.compile(model)`` if a forward and backward through it work (on every rank), else the
        model itself. The trial leaves no trace: gradients cleared, RNG states restored."""
        compiled, error = None, None
        try:
            compiled = torch.compile(self.model, backend=COMPILE_BACKEND)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, device_type=self.device.type), self.autocast():
                compiled(batch).backward()
        except Exception as exc:  # a compiler problem must never fail the job: train eagerly instead
            error = exc
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        ok = self.ctx.all_agree(error is None)
        if not ok:
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            log.warning("torch.compile failed, training without it: %s", str(reason)[:2000])
            return self.model
        self.compiled = True
        log.info("training with torch.compile (backend %s)", COMPILE_BACKEND)
        return compiled


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (one pass over the parameters) where it exists for them."""
    return bool(params) and all(
        p.dtype.is_floating_point and p.device.type in ("cuda", "cpu") for p in params
    )


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
    on_resume: Callable[[int], object] | None = None,
) -> TrainResult:
    """Train ``model`` (``model(batch) -> scalar loss``) and return the per-epoch history.

    ``on_resume(epoch)`` is called when training resumes from the checkpoint of ``epoch`` (before the
    epochs after it run again). Under torchrun every process calls this with the same arguments; only
    rank 0 calls ``on_progress``, ``on_epoch``, ``on_resume`` and ``should_cancel`` and writes the
    checkpoint (see ``services.training.distributed``).
    """
    ctx, device = distributed.setup(device)
    try:
        return _train(
            model, train_set, cfg, device, ctx, checkpoint_path, val_set, on_progress, on_epoch,
            should_cancel, progress_interval_s, on_resume,
        )  # fmt: skip
    finally:
        ctx.close(model)


def _train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    ctx: DistContext,
    checkpoint_path: Path,
    val_set: Dataset | None,
    on_progress: Callable[[Progress], None] | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    should_cancel: Callable[[], bool] | None,
    progress_interval_s: float,
    on_resume: Callable[[int], object] | None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)  # the same on every rank: model-internal noise is drawn in step
    model.to(device)
    ctx.setup_model(model)
    step_fn = TrainStep(model, cfg, device, ctx)
    sampler = ctx.sampler(train_set, cfg.seed)
    local_batch = ctx.local_batch_size(cfg.batch_size)
    local_batch = min(local_batch, len(sampler))
    if local_batch < 1:
        raise ValueError(
            f"{len(train_set)} training samples cannot make a batch on {ctx.world_size} processes"
        )
    loader = DataLoader(
        train_set, batch_size=local_batch, sampler=sampler, drop_last=True, num_workers=cfg.num_workers
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

    result = TrainResult()
    start_epoch = 1
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        step_fn.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and step_fn.scaler.is_enabled():
            step_fn.scaler.load_state_dict(state["scaler"])
        result.history = state["history"]
        start_epoch = state["epoch"] + 1
        result.resumed_from_epoch = state["epoch"]
        if on_resume is not None and ctx.is_main:
            on_resume(result.resumed_from_epoch)

    step = (start_epoch - 1) * steps_per_epoch
    after_step = getattr(model, "after_step", None)  # see the module docstring
    last_report = -math.inf  # the first step reports
    lr = lr_at(step, total_steps, warmup_steps, cfg.learning_rate, cfg.min_lr)
    run_started, run_start_step = time.perf_counter(), step
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        epoch_started, losses, seen = time.perf_counter(), [], 0
        for batch in loader:
            asked = should_cancel is not None and ctx.is_main and should_cancel()
            if ctx.decide(asked):
                raise Cancelled(f"cancelled at epoch {epoch}, step {step}")
            lr = lr_at(step, total_steps, warmup_steps, cfg.learning_rate, cfg.min_lr)
            for group in step_fn.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # e.g. layer-wise lr decay
            batch = batch.to(device, non_blocking=True)
            loss = step_fn.forward(batch)
            value = ctx.mean(loss)  # every rank sees the same value, so all raise together
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at epoch {epoch}, step {step}: lower the lr")
            step_fn.update(loss)
            if after_step is not None:
                after_step(step, total_steps)
            step += 1
            seen += len(batch) * ctx.world_size
            losses.append(value)
            now = time.perf_counter()
            # at most every progress_interval_s, and at each epoch's last step: an epoch shorter than the
            # interval still ends on its own step and loss, as its metrics arrive
            due = now - last_report >= progress_interval_s or step % steps_per_epoch == 0
            if on_progress is not None and ctx.is_main and due:
                last_report = now
                rate = (step - run_start_step) / max(now - run_started, 1e-9)
                on_progress(
                    Progress(
                        epoch=epoch,
                        epochs=cfg.epochs,
                        step=step,
                        total_steps=total_steps,
                        loss=value,
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
            shard = ctx.eval_shard(val_set)  # rank r: samples r, r + W, ... in batches of batch_size / W
            sums = _loss_sums(
                model, shard, ctx.local_batch_size(cfg.batch_size), device, cfg.seed, step_fn.dtype
            )
            total, count = ctx.sum(list(sums))
            metrics["val_loss"] = total / count
        metrics["epoch_s"] = time.perf_counter() - epoch_started  # steps and validation, this rank's clock
        result.history.append({"epoch": epoch, **metrics})
        if on_epoch is not None and ctx.is_main:
            on_epoch(epoch, metrics)
        if ctx.is_main and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
            save_checkpoint(checkpoint_path, model, step_fn.optimizer, epoch, result.history, step_fn.scaler)
    ctx.barrier()  # the last checkpoint exists on return, on every rank
    return result


@torch.no_grad()
def _loss_sums(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    seed: int,
    dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """(sum of per-sample objective, number of samples), with a fixed RNG (restored afterwards)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed + 1)
        for batch in DataLoader(dataset, batch_size=batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(batch.to(device))
            total += float(loss) * len(batch)
            count += len(batch)
    model.train(was_training)
    return total, count


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, float]],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind.

    ``model`` is the plain module (never the compiled or DDP wrapper), so the keys are its own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
    }
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp)
    tmp.replace(path)
