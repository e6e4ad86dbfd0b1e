"""ST-MEM pretraining throughput: this implementation against a plain reference, in one run.

Both models are the same ST-MEM masked autoencoder with the same weights (the reference loads this
implementation's state dict, strict), fed the same batches with the same masks (the RNG is reseeded
identically before every step), and both run the same step: forward, backward, AdamW step.

- "plain": the architecture written straightforwardly, as the original code does it: manual
  ``softmax(q k^T / sqrt(d)) v`` attention, the lead-wise decoding loop over the 12 leads, fp32, no
  compile, ``torch.optim.AdamW`` with its default implementation.
- "ours": ``services.models.st_mem.StMemMae`` stepped exactly as ``services.training.loop.train`` steps
  it (``TrainStep``): autocast as ``TrainConfig.amp`` selects it for the device (bf16 on CUDA, and on
  CPUs with native bf16), ``torch.compile`` with ``--compile``, fused AdamW (the same update).

Samples/s are measured after warm-up over several repeats, alternating between the two models (so that
drifts of a shared machine hit both alike); the median is reported, and the load average around it.

    .venv/bin/python bench/pretrain_throughput.py [--size small] [--batch 16] [--steps 3] [--repeats 5]
        [--device auto|cpu|cuda] [--amp auto|on|off] [--compile]
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

from services.models.st_mem import SIZES, StMemConfig, StMemMae  # noqa: E402
from services.training.loop import TrainConfig, TrainStep, pick_device  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptbxl-500"

# --------------------------------------------------------------------------------------------------
# The plain reference: ST-MEM's MAE as the original code writes it (same parameter names and shapes).


class PlainAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, qkv_bias: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class PlainPreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class PlainFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, qkv_bias: bool):
        super().__init__()
        self.attn = PlainPreNorm(dim, PlainAttention(dim, heads, dim_head, qkv_bias))
        self.ff = PlainPreNorm(dim, PlainFeedForward(dim, mlp_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


class PlainEncoder(nn.Module):
    def __init__(self, cfg: StMemConfig):
        super().__init__()
        self.cfg = cfg
        self.to_patch_embedding = nn.Sequential(
            nn.Identity(),
            nn.LayerNorm(cfg.patch_size),
            nn.Linear(cfg.patch_size, cfg.width),
            nn.LayerNorm(cfg.width),
        )
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 2, cfg.width), requires_grad=False)
        self.sep_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.lead_embeddings = nn.ParameterList(
            nn.Parameter(torch.zeros(cfg.width)) for _ in range(cfg.num_leads)
        )
        for i in range(cfg.depth):
            self.add_module(
                f"block{i}", PlainBlock(cfg.width, cfg.heads, cfg.dim_head, cfg.mlp_dim, cfg.qkv_bias)
            )
        self.norm = nn.LayerNorm(cfg.width)


class PlainMae(nn.Module):
    """The original ``ST_MEM`` forward: patchify, mask, encode, and decode each lead in turn."""

    def __init__(self, cfg: StMemConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PlainEncoder(cfg)
        self.to_patch_embedding = self.encoder.to_patch_embedding
        self.to_decoder_embedding = nn.Linear(cfg.width, cfg.decoder_width)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, cfg.num_patches + 2, cfg.decoder_width), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            PlainBlock(cfg.decoder_width, cfg.decoder_heads, 64, cfg.decoder_width * 4, cfg.qkv_bias)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width, eps=1e-6)
        self.decoder_head = nn.Linear(cfg.decoder_width, cfg.patch_size)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        b, c, n, d = x.shape
        len_keep = int(n * (1 - mask_ratio))
        noise = torch.rand(b, c, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=2)
        ids_restore = torch.argsort(ids_shuffle, dim=2)
        ids_keep = ids_shuffle[:, :, :len_keep]
        x_masked = torch.gather(x, dim=2, index=ids_keep.unsqueeze(-1).repeat(1, 1, 1, d))
        mask = torch.ones([b, c, n], device=x.device)
        mask[:, :, :len_keep] = 0
        mask = torch.gather(mask, dim=2, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, series: torch.Tensor, mask_ratio: float):
        enc = self.encoder
        b, c, length = series.shape
        x = series.reshape(b, c, length // self.cfg.patch_size, self.cfg.patch_size)
        x = self.to_patch_embedding(x)
        n = x.shape[2]
        x = x + enc.pos_embedding[:, 1 : n + 1, :].unsqueeze(1)
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        sep = enc.sep_embedding[None, None, None, :]
        left = sep.expand(b, c, -1, -1) + enc.pos_embedding[:, :1, :].unsqueeze(1)
        right = sep.expand(b, c, -1, -1) + enc.pos_embedding[:, -1:, :].unsqueeze(1)
        x = torch.cat([left, x, right], dim=2)
        leads = torch.stack([enc.lead_embeddings[i] for i in range(c)]).unsqueeze(0)
        x = x + leads.unsqueeze(2).expand(b, -1, x.shape[2], -1)
        x = x.reshape(b, -1, x.shape[-1])
        for i in range(self.cfg.depth):
            x = getattr(enc, f"block{i}")(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        b, c, n = ids_restore.shape
        x = self.to_decoder_embedding(x)
        x = x.reshape(b, c, -1, x.shape[-1])
        d = x.shape[-1]
        masks = self.mask_embedding.unsqueeze(1).repeat(b, c, n + 2 - x.shape[2], 1)
        x_wo_sep = torch.cat([x[:, :, 1:-1, :], masks], dim=2)
        x_wo_sep = torch.gather(x_wo_sep, dim=2, index=ids_restore.unsqueeze(-1).repeat(1, 1, 1, d))
        x_wo_sep = x_wo_sep + self.decoder_pos_embed[:, 1 : n + 1, :].unsqueeze(1)
        left = x[:, :, :1, :] + self.decoder_pos_embed[:, :1, :].unsqueeze(1)
        right = x[:, :, -1:, :] + self.decoder_pos_embed[:, -1:, :].unsqueeze(1)
        x = torch.cat([left, x_wo_sep, right], dim=2)
        decoded = []
        for i in range(c):  # lead-wise decoding, one lead at a time (methods.md 1.3)
            x_lead = x[:, i, :, :]
            for block in self.decoder_blocks:
                x_lead = block(x_lead)
            x_lead = self.decoder_head(self.decoder_norm(x_lead))
            decoded.append(x_lead[:, 1:-1, :])
        return torch.stack(decoded, dim=1)

    def loss(self, series: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, length = series.shape
        target = series.reshape(b, c, length // self.cfg.patch_size, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward_all(self, series: torch.Tensor, mask_ratio: float = 0.75):
        latent, mask, ids_restore = self.forward_encoder(series, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(series, pred, mask), pred, mask

    def forward(self, series: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
        return self.forward_all(series, mask_ratio)[0]


def plain_copy(model: StMemMae) -> PlainMae:
    """A ``PlainMae`` holding exactly ``model``'s weights (strict load: same names, same shapes)."""
    plain = PlainMae(model.cfg)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


# --------------------------------------------------------------------------------------------------
# measurement


def real_batches(batch: int, n_batches: int) -> torch.Tensor:
    """(n_batches, batch, 12, 2250): centre windows of real PTB-XL records, or noise without the data."""
    count = batch * n_batches
    headers = sorted((DATA / "records500").glob("*/*_hr.hea"))[:count] if DATA.is_dir() else []
    if len(headers) < count:
        print(f"(no PTB-XL at {DATA}: standard-normal batches instead)")
        return torch.randn(n_batches, batch, 12, 2250, generator=torch.Generator().manual_seed(0))
    from services.ecg.preprocess import InputSpec, preprocess
    from services.ecg.recording import read_wfdb

    windows = [preprocess(read_wfdb(h), InputSpec(), "center")[0] for h in headers]
    return torch.from_numpy(np.stack(windows)).reshape(n_batches, batch, 12, 2250)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainStep:
    """forward + backward + AdamW (default implementation), fp32, eager."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model = model
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay
        )

    def __call__(self, batch: torch.Tensor) -> float:
        loss = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def run_steps(step, batches: torch.Tensor, steps: int, first: int, device: torch.device) -> float:
    """samples/s over ``steps`` steps; batch i uses masks seeded with ``first + i`` (same for both)."""
    sync(device)
    started = time.perf_counter()
    for i in range(steps):
        torch.manual_seed(first + i)
        step(batches[(first + i) % len(batches)])
    sync(device)
    return steps * batches.shape[1] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="ours: autocast")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--no-fp32", action="store_true", help="skip ours without autocast")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = TrainConfig(epochs=1, batch_size=args.batch, learning_rate=1e-4, compile=args.compile)
    if args.amp != "auto":
        cfg.amp = args.amp == "on"
    batches = real_batches(args.batch, 4).to(device)

    torch.manual_seed(0)
    ours_model = StMemMae(SIZES[args.size]).to(device)
    plain_model = plain_copy(ours_model).to(device)
    ours = TrainStep(ours_model, cfg, device)
    plain = PlainStep(plain_model, cfg)
    contenders = {"ours": ours, "plain": plain}
    if ours.dtype is not None and not args.no_fp32:  # also ours without autocast: what precision brings
        fp32_model = StMemMae(SIZES[args.size]).to(device)
        fp32_model.load_state_dict(ours_model.state_dict())
        contenders["ours fp32"] = TrainStep(fp32_model, replace(cfg, amp=False), device)

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

    params = sum(p.numel() for p in ours_model.parameters())
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"ST-MEM MAE '{args.size}' ({params / 1e6:.2f} M params), batch {args.batch}, {device.type} ({name})"
    )
    print(
        f"torch {torch.__version__}; ours: {ours.describe()}; plain: fp32, eager, manual attention, lead loop"
    )
    print(f"first loss at the same weights/masks (fp32): ours {loss_ours:.6f}  plain {loss_plain:.6f}")
    print(
        f"repeats: {args.repeats} x {args.steps} steps after {args.warmup} warm-up steps; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    for name, values in rates.items():
        print(f"  {name:9s}: {' '.join(f'{v:7.2f}' for v in values)}  median {medians[name]:8.2f} samples/s")
    if "ours fp32" in medians:
        print(f"ratio ours fp32/plain: {medians['ours fp32'] / medians['plain']:.2f}  (same precision)")
    ours_rate, plain_rate = medians["ours"], medians["plain"]
    print(f"ratio ours/plain: {ours_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
