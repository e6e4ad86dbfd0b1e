"""ECG-JEPA: joint-embedding predictive architecture for 8-lead ECGs (Kim, arXiv 2410.08559).

Each of the 8 leads (I, II, V1-V6; 2500 samples at 250 Hz) is cut into 50 patches of 50 samples, and a
shared linear map turns every patch into a token: 8 x 50 = 400 tokens, lead-major. A fixed 2-D sin-cos
table (time index in the first half of the features, lead index in the second) is added to the input of
*every* block. Attention is CroPA (cross-pattern attention): a token attends only to the tokens of its own
lead or of its own time patch (50 + 8 - 1 = 57 keys of 400).

Pretraining masks time patches (the same ones in every lead and every sample of the batch, one draw per
step): the context encoder sees the visible patches, a per-lead predictor fills in the masked ones, and
the targets are the target encoder's (an EMA of the context encoder) layer-normed tokens at the masked
positions; SmoothL1 loss. The EMA momentum rises linearly from 0.996 to 1.0 over training: the training
loop calls ``after_step`` after every optimiser step.

Parameter names follow the official code (``encoder_blocks.blocks.{i}.attn.qkv`` and so on), so that the
released encoder checkpoint (``{'encoder': state_dict}``, the *context* encoder) loads unchanged.

Differences from the original, deliberate:
- the multi-block sampler draws a block's start from 0..p-len (the original: 0..p-len-1, so the last
  patch is never masked); ``MaskConfig(original_block_starts=True)`` restores the original;
- the context encoder projects only the visible patches (the original projects all 400, then slices);
  the predictor normalises and projects only the masked tokens (it keeps only those). Same results.
- CroPA is computed by its two patterns (``cropa_attention``): each query scores the n keys of its lead and
  the C keys of its time patch, 58 logits in one softmax, not 400 logits with all but 57 masked (the original
  rebuilds a 0/1 mask with Python loops at every call and applies it with ``masked_fill``). Same results
  (``cropa_mask`` is the reference the tests check it against); tiny pretraining steps 1.85x faster on the
  CPU (bench/pretrain_throughput.py).
- the ``tiny`` size (ours, for CPUs) draws the patch projection ``W_P`` at std 0.4, not 0.02 (``base``
  keeps 0.02). At 0.02 the fixed sin-cos table (rms 0.7 per feature, added before every block) dwarfs the
  patch tokens of a standardised window (rms 0.14), so the masked targets are predictable from position
  alone and the tiny encoder learns nothing about the record; the measurements that chose 0.4 are in
  ``reports/design_notes.md``.
Kept from the original: the target encoder is a deep copy that runs in the model's mode (with drop-path
while training); one mask per step.

Input: the service feeds band-passed windows standardised per window (``services.ecg.preprocess`` with
``INPUT_SPEC``); the original pretrains on raw, unfiltered millivolts, so the released weights see inputs
of another scale here (about 5-10x larger).
"""

import copy
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# the spec lives in ecg_jepa_spec (torch-free); its names are importable here too
from services.models.ecg_jepa_spec import INPUT_SPEC as INPUT_SPEC
from services.models.ecg_jepa_spec import LEADS as LEADS
from services.models.ecg_jepa_spec import SIZES as SIZES
from services.models.ecg_jepa_spec import SPEC, EcgJepaConfig, MaskConfig
from services.models.family import Family

# --------------------------------------------------------------------------------------------------
# masks: positions (time patches) to predict, and CroPA


def random_time_mask(num_patches: int, scale: tuple[float, float]) -> torch.Tensor:
    """(p,) bool, True = masked: int(p*r) patches at random, r ~ U(scale)."""
    ratio = scale[0] + (scale[1] - scale[0]) * torch.rand(1).item()
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[torch.randperm(num_patches)[: int(num_patches * ratio)]] = True
    return mask


def block_time_mask(
    num_patches: int, scale: tuple[float, float], blocks: int = 4, original_starts: bool = False
) -> torch.Tensor:
    """(p,) bool, True = masked: the union of ``blocks`` runs of int(p*r) patches, r ~ U(scale) each.

    A run of ``n`` patches starts anywhere in 0..p-n, so every patch can be masked; ``original_starts``
    draws from 0..p-n-1 as the original does (the last patch is then never masked).
    """
    mask = torch.zeros(num_patches, dtype=torch.bool)
    for _ in range(blocks):
        ratio = scale[0] + (scale[1] - scale[0]) * torch.rand(1).item()
        n = int(num_patches * ratio)
        starts = num_patches - n if original_starts else num_patches - n + 1
        start = int(torch.randint(starts, (1,)))
        mask[start : start + n] = True
    return mask


@lru_cache(maxsize=64)
def cropa_mask(num_leads: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """(C*n, C*n) bool, True = may attend: tokens (lead i, patch a) -> (lead j, patch b) iff i = j or a = b.

    Tokens are lead-major (lead 0 patches 0..n-1, lead 1 ...). The mask of the context encoder's visible
    tokens (the same n kept time patches in every lead) is this mask for n patches: two kept tokens share a
    time patch iff they have the same rank among the kept ones. Built once per shape and device.
    """
    with torch.inference_mode(False):  # a normal tensor even if first built under inference mode
        lead = torch.arange(num_leads, device=device).repeat_interleave(num_patches)  # (C*n,)
        time = torch.arange(num_patches, device=device).repeat(num_leads)  # (C*n,)
        return (lead[:, None] == lead[None, :]) | (time[:, None] == time[None, :])


def cropa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_leads: int) -> torch.Tensor:
    """Attention under ``cropa_mask``, by its two patterns: q, k, v (B, H, C*n, dh), lead-major -> the same.

    Query (lead i, patch a) scores the n keys of lead i and the C keys of patch a; the second pattern drops
    (i, a) itself, already in the first, so one softmax runs over its n + C - 1 allowed logits. Equal to
    ``scaled_dot_product_attention`` with the mask, at (n + C) / (C*n) of its logits (58 of 400).
    """
    b, h, tokens, dh = q.shape
    c, n = num_leads, tokens // num_leads
    q = q.reshape(b, h, c, n, dh) * dh**-0.5
    k, v = k.reshape(b, h, c, n, dh), v.reshape(b, h, c, n, dh)
    by_lead = q @ k.transpose(-1, -2)  # (B, H, C, n, n): within each lead
    q_t, k_t, v_t = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # (B, H, n, C, dh)
    lead = torch.arange(c, device=q.device)
    self_key = lead[:, None] == lead[None, :]  # (C, C) (not torch.eye: ONNX Runtime has no boolean EyeLike)
    by_time = (q_t @ k_t.transpose(-1, -2)).masked_fill(self_key, float("-inf"))  # (B, H, n, C, C)
    weights = torch.cat([by_lead, by_time.transpose(2, 3)], dim=-1).softmax(dim=-1)  # (B, H, C, n, n + C)
    w_lead, w_time = weights.split([n, c], dim=-1)
    out = w_lead @ v + (w_time.transpose(2, 3) @ v_t).transpose(2, 3)  # (B, H, C, n, dh)
    return out.reshape(b, h, tokens, dh)


# --------------------------------------------------------------------------------------------------
# positional tables


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, width): sin | cos of position * 10000^(-k / (width/2))."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(width: int, num_leads: int, num_patches: int) -> torch.Tensor:
    """(C*p, width), lead-major: the first half encodes the time patch, the second half the lead."""
    time = torch.arange(num_patches).repeat(num_leads)
    lead = torch.arange(num_leads).repeat_interleave(num_patches)
    return torch.cat([sincos_1d(width // 2, time), sincos_1d(width // 2, lead)], dim=1).float()


# --------------------------------------------------------------------------------------------------
# Transformer (pre-LN ViT block, timm naming)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cropa_leads: int | None = None) -> torch.Tensor:
        """``cropa_leads``: the tokens are that many leads' patches, lead-major, under CroPA; None: full
        attention (the predictor's per-lead sequences)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, dh) each
        if cropa_leads is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, n, dh)
        else:
            out = cropa_attention(q, k, v, cropa_leads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: while training, zero a sample's residual branch with probability p (scaled)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        # registration order = the official state dict's order: norm1, norm2, mlp, attn
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, heads, qkv_bias)

    def forward(self, x: torch.Tensor, cropa_leads: int | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), cropa_leads))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Blocks(nn.Module):
    """``depth`` blocks; the positional table is added to the input of every block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear, 0 .. drop_path
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, rate) for rate in rates)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cropa_leads: int | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos, cropa_leads)
        return x


def init_weights(module: nn.Module, blocks: Blocks, std: float) -> None:
    """The original's init: Linear trunc-normal(std), bias 0; LayerNorm (1, 0); the residual outputs of
    block l (attn.proj, mlp.fc2; l from 1) divided by sqrt(2 l)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, block in enumerate(blocks.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


# --------------------------------------------------------------------------------------------------
# Encoder (context and target)


class EcgJepaEncoder(nn.Module):
    """The ECG-JEPA ViT with CroPA; ``forward`` returns the (B, width) representation: the final
    LayerNorm of every token, then the mean over all C*p tokens."""

    def __init__(self, cfg: EcgJepaConfig):
        super().__init__()
        self.cfg = cfg
        # registration order = the official state dict's order: pos_embed, encoder_blocks, norm, W_P
        table = sincos_2d(cfg.width, cfg.num_leads, cfg.num_patches)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # (C*p, D), fixed
        self.encoder_blocks = Blocks(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_path
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.W_P = nn.Linear(cfg.patch_size, cfg.width)  # patch -> token, shared by the leads
        init_weights(self, self.encoder_blocks, cfg.init_std)
        if cfg.patch_init_std is not None:
            nn.init.trunc_normal_(self.W_P.weight, std=cfg.patch_init_std)

    def forward_tokens(self, series: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, L) -> (B, C*n, D) normalised tokens, lead-major; only the time patches ``visible`` (n,)
        of every lead when given (the context encoder), else all p."""
        cfg = self.cfg
        b, c, length = series.shape
        x = self.W_P(series.reshape(b, c, length // cfg.patch_size, cfg.patch_size))  # (B, C, p, D)
        pos = self.pos_embed.reshape(cfg.num_leads, cfg.num_patches, cfg.width)  # (C, p, D)
        if visible is not None:
            x, pos = x[:, :, visible], pos[:, visible]  # (B, C, n, D), (C, n, D)
        n = x.shape[2]
        x = x.reshape(b, c * n, cfg.width)
        x = self.encoder_blocks(x, pos.reshape(1, c * n, cfg.width), cropa_leads=c)
        return self.norm(x)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(series).mean(dim=1)  # (B, D)


# --------------------------------------------------------------------------------------------------
# Predictor


class EcgJepaPredictor(nn.Module):
    """Per-lead predictor: each lead's visible tokens plus one mask token per masked patch, a narrower
    Transformer with a time-only sin-cos table (leads never mix), back to the encoder width."""

    def __init__(self, cfg: EcgJepaConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.predictor_width
        self.predictor_embed = nn.Linear(cfg.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # a 1 x p grid: the lead half of the table is the same for every row
        self.pos_embed = nn.Parameter(sincos_2d(width, 1, cfg.num_patches), requires_grad=False)  # (p, Dp)
        self.predictor_blocks = Blocks(
            width, cfg.predictor_depth, cfg.predictor_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_path
        )
        self.predictor_norm = nn.LayerNorm(width)
        self.predictor_proj = nn.Linear(width, cfg.width)
        init_weights(self, self.predictor_blocks, cfg.init_std)
        nn.init.trunc_normal_(self.mask_token, std=cfg.init_std)

    def forward(self, context: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """context (B, C*n_vis, D) at time patches ``visible`` -> predictions (B, C*n_mask, D) at
        ``masked``, lead-major."""
        b, c = context.shape[0], self.cfg.num_leads
        n_vis, n_mask = len(visible), len(masked)
        x = self.predictor_embed(context)  # (B, C*n_vis, Dp)
        x = x.reshape(b * c, n_vis, -1)  # one sequence per lead
        x = torch.cat([x, self.mask_token.expand(b * c, n_mask, -1)], dim=1)  # (B*C, n_vis + n_mask, Dp)
        pos = self.pos_embed[torch.cat([visible, masked])]  # (n_vis + n_mask, Dp)
        x = self.predictor_blocks(x, pos[None])
        x = self.predictor_proj(self.predictor_norm(x[:, n_vis:]))  # (B*C, n_mask, D)
        return x.reshape(b, c * n_mask, -1)


# --------------------------------------------------------------------------------------------------
# JEPA pretraining


class EcgJepa(nn.Module):
    """ECG-JEPA pretraining: ``forward(series) -> loss``; ``after_step`` updates the EMA target encoder.

    ``encoder`` is the context encoder: the one the original saves (``{'encoder': state_dict}``) and the
    one to serve. ``target_encoder`` is its EMA, kept in the state dict so that training resumes exactly.
    """

    def __init__(
        self, cfg: EcgJepaConfig, mask: MaskConfig | None = None, ema: tuple[float, float] = (0.996, 1.0)
    ):
        super().__init__()
        self.cfg = cfg
        self.mask = mask or MaskConfig()
        self.ema = ema
        self.encoder = EcgJepaEncoder(cfg)
        self.predictor = EcgJepaPredictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.momentum = ema[0]  # the last applied EMA momentum

    def sample_mask(self) -> torch.Tensor:
        """(p,) bool, True = masked: one draw for the whole batch and every lead."""
        p, m = self.cfg.num_patches, self.mask
        if m.kind == "random":
            return random_time_mask(p, m.ratios)
        return block_time_mask(p, m.ratios, m.blocks, m.original_block_starts)

    def forward(self, series: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """series (B, C, L) -> SmoothL1 loss at the masked time patches; ``mask`` (p,) bool fixes the draw."""
        if mask is None:
            mask = self.sample_mask()
        if not 0 < int(mask.sum()) < len(mask):
            raise ValueError(f"the mask must hide some but not all of the {len(mask)} time patches")
        visible = (~mask).nonzero()[:, 0].to(series.device)  # (n_vis,)
        masked = mask.nonzero()[:, 0].to(series.device)  # (n_mask,)
        b, c, _ = series.shape

        with torch.no_grad():
            h = self.target_encoder.forward_tokens(series)  # (B, C*p, D)
            h = F.layer_norm(h, h.shape[-1:])  # parameter-free, over the features
            target = h.reshape(b, c, self.cfg.num_patches, -1)[:, :, masked]  # (B, C, n_mask, D)
            target = target.reshape(b, c * len(masked), -1)

        context = self.encoder.forward_tokens(series, visible)  # (B, C*n_vis, D)
        pred = self.predictor(context, visible, masked)  # (B, C*n_mask, D)
        return F.smooth_l1_loss(pred.float(), target.float())  # beta 1, mean over all elements

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The EMA momentum after optimiser step ``step`` (0-based) of ``total_steps``: linear in the step,
        ``ema[0]`` after the first step, reaching ``ema[1]`` at ``total_steps``."""
        start, end = self.ema
        return start + (end - start) * min(step / max(total_steps, 1), 1.0)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update after an optimiser step: target <- m * target + (1 - m) * context."""
        self.momentum = self.momentum_at(step, total_steps)
        for target, context in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            target.lerp_(context, 1.0 - self.momentum)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as the original: ``weight_decay`` on weights of 2+ dims, none on biases and 1-D
        parameters (norms); the fixed tables and the target encoder are not optimised."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# The family: sizes, input, objective, recipes


class LeadTokens(nn.Module):
    """An ECG-JEPA encoder seen as per-lead patch tokens, for the token VQ-VAE: ``forward_tokens``
    (B, C, L) -> (B, C, N, D), its lead-major (B, C * N, D) normalised tokens regrouped by lead."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.cfg = encoder.cfg

    def forward_tokens(self, signals: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_tokens(signals)  # (B, C * N, D), lead-major
        return tokens.reshape(signals.shape[0], signals.shape[1], -1, tokens.shape[-1])

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.encoder(signals)


def _objective(cfg: EcgJepaConfig, params) -> EcgJepa:
    return EcgJepa(cfg, MaskConfig(**params.jepa_masking.model_dump()))


FAMILY = Family.of(
    SPEC,
    encoder_class=EcgJepaEncoder,
    objective=_objective,
    blocks=lambda encoder: list(encoder.encoder_blocks.blocks),
    tokens=LeadTokens,
)
