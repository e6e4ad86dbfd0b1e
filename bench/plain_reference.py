"""Plain references for ``bench/pretrain_throughput.py``: the two pretraining models written as the original
code writes them, with this implementation's parameter names and shapes (each loads our state dict,
strict), so that the benchmark times both on the same weights, batches and masks, and the tests check
that both compute the same loss and gradients (tests/test_st_mem.py, tests/test_ecg_jepa.py).

- ST-MEM (``bakqui/ST-MEM``): manual ``softmax(q k^T / sqrt(d)) v`` attention, the lead-by-lead decoding
  loop over the 12 leads.
- ECG-JEPA (``sehunfromdaegu/ECG_JEPA``, methods.md 2.2-2.5): timm-style blocks with manual attention,
  CroPA as the original applies it: a float 0/1 (C*p, C*p) mask built with Python loops at every encoder
  call, sliced to the visible tokens, disallowed logits ``masked_fill``-ed with -inf before the softmax;
  all C*p patches projected, then sliced; the predictor normalises and projects all its tokens; the EMA
  update a loop of ``mul_`` / ``add_`` over the parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn

from services.models.ecg_jepa import EcgJepa, EcgJepaConfig
from services.models.st_mem import StMemConfig, StMemMae

# --------------------------------------------------------------------------------------------------
# ST-MEM


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
# ECG-JEPA


class PlainJepaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if attention_mask is not None:
            attn = attn.masked_fill(attention_mask == 0, float("-inf"))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class PlainJepaMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PlainDropPath(nn.Module):
    """timm's DropPath (the same draws as ours: one Bernoulli per sample)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)


class PlainJepaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = PlainDropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = PlainJepaMlp(dim, int(dim * mlp_ratio))
        self.attn = PlainJepaAttention(dim, heads, qkv_bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attention_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PlainJepaBlocks(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        rates = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList(PlainJepaBlock(dim, heads, mlp_ratio, qkv_bias, r) for r in rates)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attention_mask: torch.Tensor | None = None):
        for block in self.blocks:
            x = block(x + pos, attention_mask)
        return x


class PlainMaskTransformer(nn.Module):
    """The original ``MaskTransformer`` (context and target encoder)."""

    def __init__(self, cfg: EcgJepaConfig):
        super().__init__()
        self.c, self.p, self.t = cfg.num_leads, cfg.num_patches, cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(self.c * self.p, cfg.width), requires_grad=False)
        self.encoder_blocks = PlainJepaBlocks(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_path
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.W_P = nn.Linear(self.t, cfg.width)

    def _cross_attention_mask(self) -> torch.Tensor:
        size = self.c * self.p
        row_mask = torch.zeros((size, size))
        for i in range(self.c):
            row_mask[i * self.p : (i + 1) * self.p, i * self.p : (i + 1) * self.p] = 1
        col_mask = torch.zeros((size, size))
        for i in range(self.p):
            col_mask[i :: self.p, i :: self.p] = 1
        return (row_mask + col_mask).clamp(max=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (bs, c, p, t); ``mask`` (p,) bool, True = masked time patch (the context encoder)."""
        bs, c, p, t = x.shape
        x = x.reshape(bs, c * p, t)
        pos_embed = self.pos_embed.unsqueeze(0).expand(bs, -1, -1)
        x = self.W_P(x)  # (bs, c*p, D): all patches
        attention_mask = self._cross_attention_mask().to(x.device)  # (c*p, c*p)
        if mask is not None:
            vis_idx = (~mask).repeat(c)
            x = x[:, vis_idx]
            pos_embed = pos_embed[:, vis_idx]
            attention_mask = attention_mask[vis_idx][:, vis_idx]
        x = self.encoder_blocks(x, pos_embed, attention_mask)
        return self.norm(x)


class PlainPredictor(nn.Module):
    """The original ``MaskTransformerPredictor``: per-lead sequences, mask tokens appended."""

    def __init__(self, cfg: EcgJepaConfig):
        super().__init__()
        width = cfg.predictor_width
        self.c, self.p = cfg.num_leads, cfg.num_patches
        self.predictor_embed = nn.Linear(cfg.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(self.p, width), requires_grad=False)
        self.predictor_blocks = PlainJepaBlocks(
            width, cfg.predictor_depth, cfg.predictor_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_path
        )
        self.predictor_norm = nn.LayerNorm(width)
        self.predictor_proj = nn.Linear(width, cfg.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bs, d = x.shape[0], x.shape[-1]
        num_mask = int(mask.sum())
        x = self.predictor_embed(x)
        x = x.reshape(bs * self.c, -1, x.shape[-1])
        x = torch.cat([x, self.mask_token.expand(bs * self.c, num_mask, -1)], dim=1)
        idx = torch.cat([(~mask).nonzero(as_tuple=True)[0], mask.nonzero(as_tuple=True)[0]])
        pos = self.pos_embed[idx].unsqueeze(0).expand(x.shape[0], -1, -1)
        x = self.predictor_blocks(x, pos)
        x = self.predictor_proj(self.predictor_norm(x))  # (bs*c, p, D)
        return x[:, -num_mask:].reshape(bs, -1, d)  # (bs, c*num_mask, D)


class PlainJepa(nn.Module):
    """The original ``ecg_jepa`` pretraining module: ``forward(series) -> loss``, ``after_step`` the EMA.

    The mask is drawn with ``services.models.ecg_jepa``'s sampler of ``mask_from``'s config, so that under
    the same RNG state both implementations mask the same time patches.
    """

    def __init__(self, cfg: EcgJepaConfig, mask_from: EcgJepa):
        super().__init__()
        self.cfg = cfg
        self.encoder = PlainMaskTransformer(cfg)
        self.predictor = PlainPredictor(cfg)
        self.target_encoder = PlainMaskTransformer(cfg).requires_grad_(False)
        self.sample_mask = mask_from.sample_mask
        self.ema = mask_from.ema

    def forward(self, series: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = self.sample_mask()
        bs, c, length = series.shape
        x = series.reshape(bs, c, length // self.cfg.patch_size, self.cfg.patch_size)
        with torch.no_grad():
            h = self.target_encoder(x)
            h = F.layer_norm(h, (h.size(-1),))
            h = h.reshape(bs, c, self.cfg.num_patches, -1)[:, :, mask.to(series.device)]
            target = h.reshape(bs, -1, h.shape[-1])
        context = self.encoder(x, mask.to(series.device))
        pred = self.predictor(context, mask.to(series.device))
        return nn.SmoothL1Loss()(pred, target)

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        start, end = self.ema
        m = start + (end - start) * min(step / max(total_steps, 1), 1.0)
        for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters(), strict=True):
            param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)


def plain_jepa_copy(model: EcgJepa) -> PlainJepa:
    """A ``PlainJepa`` holding exactly ``model``'s weights (strict load: same names, same shapes)."""
    plain = PlainJepa(model.cfg, model)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.train(model.training)
