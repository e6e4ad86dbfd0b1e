"""Data parallelism for the training loop: torchrun / DistributedDataParallel, transparently.

Launched with ``torchrun --nproc_per_node N ...`` (or ``python -m torch.distributed.run``), every process
calls ``train()`` with the same arguments. ``train()`` then

- joins the process group (``nccl`` on CUDA, each process on ``cuda:LOCAL_RANK``; ``gloo`` on CPU) unless
  the caller already did, and leaves it again at the end if it joined it;
- wraps the model in ``DistributedDataParallel`` (gradients averaged over the ranks);
- deals each epoch's shuffled order with a ``DistributedSampler`` (``set_epoch`` per epoch): rank r takes
  positions r, r + W, r + 2W, ... of the order, i.e. of every global batch; the per-rank batch is the
  global batch / W, so the optimisation is the one of a single process on the same global batches;
- has only rank 0 report progress and epoch metrics and write checkpoints (every rank reads them to
  resume); only rank 0 asks whether to cancel, and broadcasts its answer each step, so that all ranks
  stop at the same step and never diverge;
- all-reduces the logged loss (mean over ranks) and the validation loss (a sum over every held-out
  sample, each evaluated once on one rank).

Randomness inside the model (ST-MEM's masks) must also be the single-process one: a model that draws
per-sample noise implements ``set_data_shard(rank, world_size)``; ``setup_model`` calls it on every
sub-module that has it. ``StMemMae`` then draws the noise of the whole global batch (all ranks hold the
same RNG state: same seed, same draws) and keeps the rows of its own samples.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op: a ``DistContext`` of one rank.

Jobs start themselves under torchrun: ``run_torchrun`` launches ``python -m torch.distributed.run
--standalone`` from the worker (``services.jobs.pretrain`` is the module each process runs).
"""

import ctypes
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """The torchrun variables of this process, or None when not launched with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    return TorchrunEnv(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
    )


@dataclass
class DistContext:
    """Where this process stands: rank, world size, and the collectives the loop needs (no-ops alone)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context initialised the process group, so it also destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------------------------
    # model and data

    def setup_model(self, model: nn.Module) -> None:
        """Tell every sub-module that draws per-sample noise which rows of the global batch it holds."""
        for module in model.modules():
            if hasattr(module, "set_data_shard"):
                module.set_data_shard(self.rank, self.world_size)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around ``module`` (its parameters are broadcast from rank 0); the module itself alone."""
        if not self.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def local_batch_size(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise ValueError(
                f"batch_size {global_batch} is not divisible by the {self.world_size} processes; "
                "the global batch is split evenly between them"
            )
        return global_batch // self.world_size

    def sampler(self, dataset: Dataset, seed: int) -> DistributedSampler:
        """The shuffled order of an epoch (``set_epoch``), dealt round-robin to the ranks; for one rank
        too, so that one process and W processes see the same global batches."""
        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed, drop_last=True
        )

    def eval_shard(self, dataset: Dataset) -> Dataset:
        """Every sample on exactly one rank (no padding, unlike ``DistributedSampler``)."""
        if not self.enabled:
            return dataset
        return Subset(dataset, range(self.rank, len(dataset), self.world_size))

    # ---------------------------------------------------------------------------------------------
    # collectives

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (NaN anywhere makes it NaN everywhere)."""
        if not self.enabled:
            return float(value.detach())
        t = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def all_agree(self, flag: bool) -> bool:
        """True only where ``flag`` is true on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self, model: nn.Module | None = None) -> None:
        if model is not None and self.enabled:
            for module in model.modules():
                if hasattr(module, "set_data_shard"):
                    module.set_data_shard(0, 1)
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """The context of this process and the device it trains on (``cuda:LOCAL_RANK`` under torchrun).

    Joins the process group when launched by torchrun with several processes and nobody joined it yet.
    """
    env = torchrun_env()
    if env is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank, world = dist.get_rank(), dist.get_world_size()  # a caller-made group without torchrun
            return DistContext(rank=rank, world_size=world, device=device), device
        return DistContext(device=device), device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=env.rank,
            world_size=env.world_size,
            device_id=device if device.type == "cuda" else None,
        )
        owns = True
        log.info("rank %d/%d joined the %s process group on %s", env.rank, env.world_size, backend, device)
    return DistContext(rank=env.rank, world_size=env.world_size, device=device, owns_group=owns), device


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch, and without torchrun: what only one process should do
    (export, register, report) checks this."""
    env = torchrun_env()
    return env is None or env.rank == 0


def die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this process when its parent dies: a worker killed mid-job
    leaves no torchrun processes behind to train on (the redelivered job starts its own). Elsewhere
    a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_torchrun(module: str, args: list[str], processes: int, log_path: Path, threads: int | None) -> int:
    """Run ``python -m module *args`` as ``processes`` torchrun processes on this machine; returns the
    exit code. Their output goes to ``log_path``; ``threads`` sets each process's OMP_NUM_THREADS."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", module, *args,
    ]  # fmt: skip
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
        return process.wait()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file (what to put in a job's error)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
