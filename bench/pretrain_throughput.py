"""Pretraining throughput (ST-MEM, ECG-JEPA): this implementation against a plain reference, in one run.

For each method both models are the same network with the same weights (the reference loads this
implementation's state dict, strict), fed the same batches with the same masks (the RNG is reseeded
identically before every step), and both run the same step: forward, backward, AdamW step (and, for
ECG-JEPA, the EMA update of the target encoder).

- "plain" (``bench/plain_reference.py``): the architecture written as the original code writes it. ST-MEM:
  manual ``softmax(q k^T / sqrt(d)) v`` attention, the lead-wise decoding loop over the 12 leads.
  ECG-JEPA: manual attention with the CroPA mask as the original applies it (a 0/1 float mask built
  every call, ``masked_fill(mask == 0, -inf)``), all patches projected then sliced, the EMA as a loop.
  Eager, ``torch.optim.AdamW`` with its default implementation; fp32, and also under the same autocast
  as ours where ours trains under one (bf16 on CPUs with native bf16).
- "ours": ``services.models`` stepped exactly as ``services.training.loop.train`` steps it
  (``TrainStep``, then ``after_step``): autocast as ``TrainConfig.amp`` selects it for the device (bf16
  on CUDA, and on CPUs with native bf16), ``torch.compile`` with ``--compile``, fused AdamW (the same
  update); "ours fp32" the same without autocast.

Samples/s are measured after warm-up over several repeats, rotating the order of the contenders (so
that drifts of a shared machine hit all alike); the median is reported, and the load average around it.
The line with "same precision" compares ours with plain at equal precision (fp32 with fp32, and bf16
autocast with bf16 autocast where the device has it).

    .venv/bin/python bench/pretrain_throughput.py [--method st_mem|ecg_jepa|all] [--size small]
        [--batch 16] [--steps 3] [--repeats 5] [--device auto|cpu|cuda] [--amp auto|on|off] [--compile]
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plain_reference import plain_copy, plain_jepa_copy  # noqa: E402
from services.ecg.preprocess import InputSpec  # noqa: E402
from services.models import ecg_jepa  # noqa: E402
from services.models.ecg_jepa import EcgJepa  # noqa: E402
from services.models.st_mem import SIZES, StMemMae  # noqa: E402
from services.training.loop import TrainConfig, TrainStep, machine_description, pick_device  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptbxl-500"
METHODS = {"st_mem": "ST-MEM MAE", "ecg_jepa": "ECG-JEPA"}
SIZES_OF = {"st_mem": SIZES, "ecg_jepa": ecg_jepa.SIZES}
TOTAL_STEPS = 10_000  # the schedule length after_step sees (the EMA momentum)

# --------------------------------------------------------------------------------------------------
# measurement


def real_batches(spec: InputSpec, batch: int, n_batches: int) -> torch.Tensor:
    """(n_batches, batch, leads, samples): centre windows of real PTB-XL records (noise without them)."""
    count = batch * n_batches
    shape = (n_batches, batch, len(spec.leads), spec.samples)
    headers = sorted((DATA / "records500").glob("*/*_hr.hea"))[:count] if DATA.is_dir() else []
    if len(headers) < count:
        print(f"(no PTB-XL at {DATA}: standard-normal batches instead)")
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    from services.ecg.preprocess import preprocess
    from services.ecg.readers import read_wfdb

    windows = [preprocess(read_wfdb(h), spec, "center")[0] for h in headers]
    return torch.from_numpy(np.stack(windows)).reshape(shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainStep:
    """forward (under ``dtype`` autocast when given) + backward + AdamW (default implementation), eager;
    then the model's ``after_step`` (ECG-JEPA's EMA), as the original's training loop."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None):
        self.model, self.device, self.dtype = model, device, dtype
        groups = model.parameters()
        if hasattr(model, "param_groups"):  # ECG-JEPA: no decay on biases and norms, as the original
            groups = model.param_groups(cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.steps = 0

    def __call__(self, batch: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if hasattr(self.model, "after_step"):
            self.model.after_step(self.steps, TOTAL_STEPS)
        self.steps += 1
        return loss.detach()


class OursStep:
    """``TrainStep`` (autocast, compile, fused AdamW), then ``after_step``: one step of ``train``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device):
        self.model = model
        self.step = TrainStep(model, cfg, device)
        self.steps = 0

    def __call__(self, batch: torch.Tensor) -> float:
        value = self.step(batch)
        if hasattr(self.model, "after_step"):
            self.model.after_step(self.steps, TOTAL_STEPS)
        self.steps += 1
        return value


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = CLOCKS["wall"]


def run_steps(step, batches: torch.Tensor, steps: int, first: int, device: torch.device) -> float:
    """samples/s over ``steps`` steps; batch i uses masks seeded with ``first + i`` (same for all)."""
    sync(device)
    started = clock()
    for i in range(steps):
        torch.manual_seed(first + i)
        step(batches[(first + i) % len(batches)])
    sync(device)
    return steps * batches.shape[1] / (clock() - started)


def build(method: str, size: str, device: torch.device) -> tuple[nn.Module, nn.Module, InputSpec]:
    """(ours, plain with the same weights, input spec) for ``method`` at ``size``."""
    torch.manual_seed(0)
    if method == "st_mem":
        ours = StMemMae(SIZES[size]).to(device)
        return ours, plain_copy(ours).to(device), InputSpec()
    ours = EcgJepa(ecg_jepa.SIZES[size]).to(device)
    return ours, plain_jepa_copy(ours).to(device), ecg_jepa.INPUT_SPEC


def bench_method(method: str, args: argparse.Namespace, cfg: TrainConfig, device: torch.device) -> None:
    if args.size not in SIZES_OF[method]:
        print(f"{METHODS[method]}: no size '{args.size}' (sizes: {', '.join(SIZES_OF[method])}); skipped\n")
        return
    ours_model, plain_model, spec = build(method, args.size, device)
    batches = real_batches(spec, args.batch, 4).to(device)
    ours = OursStep(ours_model, cfg, device)
    dtype = ours.step.dtype
    contenders = {"ours": ours, "plain": PlainStep(plain_model, cfg, device, None)}
    if dtype is not None and not args.no_fp32:  # both at fp32 too: what precision brings, and the same-
        fp32_model, plain_amp_model, _ = build(method, args.size, device)  # precision ratio at fp32
        contenders["ours fp32"] = OursStep(fp32_model, replace(cfg, amp=False), device)
        contenders["plain amp"] = PlainStep(plain_amp_model, cfg, device, dtype)

    # the same model: the first loss agrees (before any step, same weights, batch and masks)
    with torch.no_grad():
        torch.manual_seed(123)
        loss_ours = float(ours_model(batches[0]))
        torch.manual_seed(123)
        loss_plain = float(plain_model(batches[0]))

    load_before = os.getloadavg()
    for step in contenders.values():
        run_steps(step, batches, args.warmup, 0, device)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders.items())
    for r in range(args.repeats):
        first = args.warmup + r * args.steps
        for name, step in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            rates[name].append(run_steps(step, batches, args.steps, first, device))
    medians = {name: statistics.median(values) for name, values in rates.items()}

    params = sum(p.numel() for p in ours_model.parameters() if p.requires_grad)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{machine_description()}; {torch.get_num_threads()} threads"
    )
    title = f"{METHODS[method]} '{args.size}'"
    print(f"{title} ({params / 1e6:.2f} M trainable params), batch {args.batch}, {device.type} ({name})")
    plain_ops = "manual attention, lead loop" if method == "st_mem" else "manual attention, CroPA masked_fill"
    print(f"torch {torch.__version__}; ours: {ours.step.describe()}; plain: fp32, eager, {plain_ops}")
    print(f"first loss at the same weights/masks (fp32): ours {loss_ours:.6f}  plain {loss_plain:.6f}")
    print(
        f"repeats: {args.repeats} x {args.steps} steps after {args.warmup} warm-up steps, {args.clock} "
        f"clock; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} CPUs)"
    )
    for name, values in rates.items():
        print(f"  {name:9s}: {' '.join(f'{v:7.2f}' for v in values)}  median {medians[name]:8.2f} samples/s")
    same = [f"fp32 {medians.get('ours fp32', medians['ours']) / medians['plain']:.2f}"]
    if "plain amp" in medians:
        same.append(f"{ours.step.describe().split(',')[0]} {medians['ours'] / medians['plain amp']:.2f}")
    elif dtype is not None:
        same = []  # --no-fp32: ours only under autocast, no plain at that precision
    if same:
        print(f"{title} ratio ours/plain at the same precision: {', '.join(same)}  (same precision)")
    print(f"ratio ours/plain: {medians['ours'] / medians['plain']:.2f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=[*METHODS, "all"], default="st_mem")
    parser.add_argument("--size", choices=sorted(set(SIZES) | set(ecg_jepa.SIZES)), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="ours: autocast")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="thread: CPU time of this thread, with --threads 1 on a CPU shared with other work",
    )
    parser.add_argument("--no-fp32", action="store_true", help="skip both at fp32 when ours uses autocast")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.threads != 1 or args.device == "cuda"):
        parser.error("--clock thread measures one CPU thread: give --threads 1 (and no GPU)")
    global clock
    clock = CLOCKS[args.clock]
    device = pick_device(args.device)
    cfg = TrainConfig(epochs=1, batch_size=args.batch, learning_rate=1e-4, compile=args.compile)
    if args.amp != "auto":
        cfg.amp = args.amp == "on"
    for method in METHODS if args.method == "all" else [args.method]:
        bench_method(method, args, cfg, device)


if __name__ == "__main__":
    main()
