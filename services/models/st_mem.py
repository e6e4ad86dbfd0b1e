"""ST-MEM: spatio-temporal masked ECG modelling (Na et al., ICLR 2024).

A ViT over per-lead patches. Each lead becomes [SEP, patch_1 .. patch_N, SEP]; all leads share the
patch embedding and a fixed 1-D sin-cos time table (SEP rows zero), and each lead adds its own learned
lead embedding. All C*(N+2) tokens attend to each other. Pretraining is a masked autoencoder with
per-lead independent random masking and a lead-wise shared decoder.

Parameter names follow the official checkpoints (``block{i}.attn.fn.to_qkv`` and so on), so that
their state dicts load unchanged.

Computation (not the results) differs from the original code for speed: fused attention (a plain
matmul-softmax-matmul under CPU autocast, faster there), all leads decoded in one batch (chunked on the
CPU) instead of a loop over the leads, only the kept patches embedded, the target's per-patch variance
without ``torch.var`` (slow over the last dimension on the CPU). ``bench/pretrain_throughput.py`` times
a plain transcription of the original (``bench/plain_reference.py``) against this; ``tests/test_st_mem.py``
checks that they agree at the same weights.
The masking noise can be given (``noise``), and under data parallelism it is drawn for the global batch
(``set_data_shard``), so that any number of processes masks a sample alike.
"""

import torch
import torch.nn.functional as F
from torch import nn

from services.models.family import Family
from services.models.st_mem_spec import SIZES as SIZES  # the spec lives there; importable here too
from services.models.st_mem_spec import SPEC, StMemConfig


def sincos_table(width: int, num_patches: int) -> torch.Tensor:
    """(num_patches + 2, width): row 0 and the last row (SEP slots) zero; rows 1..N sin | cos of index."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = torch.arange(num_patches, dtype=torch.float64)[:, None] * omega[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    zero = torch.zeros(1, width, dtype=torch.float64)
    return torch.cat([zero, table, zero]).float()


# --------------------------------------------------------------------------------------------------
# Transformer block (pre-LN), named like the original: attn = PreNorm(Attention), ff = PreNorm(MLP)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # chunk, then view each of q, k, v as heads (the original's layout): the backward is one cat of the
        # three gradients, where indexing a permuted (3, B, H, n, dh) tensor zero-fills and adds three times
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = attention(q, k, v)  # (B, H, n, dh)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, n, H*dh) -> (B, n, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, n, d).

    ``scaled_dot_product_attention`` (fused kernels, strided q, k, v without copies), except under CPU
    bf16/fp16 autocast: there the plain composition of two batched matmuls and a softmax taken in fp32,
    which measured faster for ST-MEM's short sequences (108 and 32 tokens) on a CPU with native bf16. In
    fp32 on the CPU the fused kernel is the faster (tiny size, 1 thread: steps 1.07x; bench/
    pretrain_throughput.py).
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, qkv_bias: bool):
        super().__init__()
        self.attn = PreNorm(dim, Attention(dim, heads, dim_head, qkv_bias))
        self.ff = PreNorm(dim, FeedForward(dim, mlp_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)


# --------------------------------------------------------------------------------------------------
# Encoder


class PatchEmbedding(nn.Sequential):
    """(B, C, L) -> (B, C, N, width): split each lead into patches, LN -> Linear -> LN."""

    def __init__(self, patch_size: int, width: int):
        super().__init__(
            nn.Identity(), nn.LayerNorm(patch_size), nn.Linear(patch_size, width), nn.LayerNorm(width)
        )
        self.patch_size = patch_size

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        b, c, length = series.shape
        return self.embed(series.reshape(b, c, length // self.patch_size, self.patch_size))

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., patch_size) -> (..., width): each patch on its own."""
        return super().forward(patches)


class StMemEncoder(nn.Module):
    """The ST-MEM ViT; ``forward`` returns the (B, width) embedding: mean over patch tokens, then LN."""

    def __init__(self, cfg: StMemConfig):
        super().__init__()
        self.cfg = cfg
        self.to_patch_embedding = PatchEmbedding(cfg.patch_size, cfg.width)
        self.pos_embedding = nn.Parameter(sincos_table(cfg.width, cfg.num_patches)[None], requires_grad=False)
        self.sep_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.lead_embeddings = nn.ParameterList(
            nn.Parameter(torch.zeros(cfg.width)) for _ in range(cfg.num_leads)
        )
        for i in range(cfg.depth):
            self.add_module(
                f"block{i}", TransformerBlock(cfg.width, cfg.heads, cfg.dim_head, cfg.mlp_dim, cfg.qkv_bias)
            )
        self.norm = nn.LayerNorm(cfg.width)

    @property
    def blocks(self) -> list[TransformerBlock]:
        return [getattr(self, f"block{i}") for i in range(self.cfg.depth)]

    def add_sep_and_leads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, n, D) patch tokens (positions added) -> (B, C*(n+2), D) with SEP and lead embeddings."""
        b, c, _, d = x.shape
        sep = self.sep_embedding.expand(b, c, 1, d)
        left = sep + self.pos_embedding[:, :1].unsqueeze(1)
        right = sep + self.pos_embedding[:, -1:].unsqueeze(1)
        x = torch.cat([left, x, right], dim=2)  # (B, C, n+2, D)
        leads = torch.stack(list(self.lead_embeddings))[:c]  # (C, D)
        x = x + leads[None, :, None, :]
        return x.reshape(b, -1, d)

    def forward_tokens(self, series: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, C, N, D) patch tokens after the blocks (SEP tokens dropped)."""
        x = self.to_patch_embedding(series)  # (B, C, N, D)
        b, c, n, d = x.shape
        x = x + self.pos_embedding[:, 1 : n + 1].unsqueeze(1)
        x = self.add_sep_and_leads(x)  # (B, C*(N+2), D)
        for block in self.blocks:
            x = block(x)
        return x.reshape(b, c, n + 2, d)[:, :, 1:-1]

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_tokens(series).mean(dim=(1, 2)))  # (B, D)


# --------------------------------------------------------------------------------------------------
# Masked autoencoder


class StMemMae(nn.Module):
    """ST-MEM pretraining: encode the kept patches of every lead, decode each lead, MSE on masked patches."""

    def __init__(self, cfg: StMemConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = StMemEncoder(cfg)
        self.to_patch_embedding = self.encoder.to_patch_embedding  # shared, as in the official checkpoint
        self.to_decoder_embedding = nn.Linear(cfg.width, cfg.decoder_width)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        self.decoder_pos_embed = nn.Parameter(
            sincos_table(cfg.decoder_width, cfg.num_patches)[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(cfg.decoder_width, cfg.decoder_heads, 64, cfg.decoder_width * 4, cfg.qkv_bias)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width, eps=1e-6)
        self.decoder_head = nn.Linear(cfg.decoder_width, cfg.patch_size)
        # see decode_leads: 256 tokens per thread at decoder width 256, more for narrower decoders
        self.cpu_chunk_rows = 256 * torch.get_num_threads() * max(1, 256 // cfg.decoder_width)
        self.data_shard = (0, 1)  # (rank, world size): see set_data_shard
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for p in [self.encoder.sep_embedding, self.mask_embedding, *self.encoder.lead_embeddings]:
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_data_shard(self, rank: int, world_size: int) -> None:
        """Data parallelism (``services.training.distributed``): this process holds rows rank, rank + W,
        ... of every global batch. ``masking_noise`` then draws the noise of the whole global batch (every
        rank holds the same RNG state) and keeps those rows, so that W processes mask each sample exactly
        as one process does on the same global batch."""
        self.data_shard = (rank, world_size)

    def masking_noise(self, b: int, c: int, n: int, device: torch.device) -> torch.Tensor:
        """Uniform noise (B, C, N) that orders each lead's patches for masking (smallest kept)."""
        rank, world = self.data_shard
        if world == 1:
            return torch.rand(b, c, n, device=device)
        return torch.rand(b * world, c, n, device=device)[rank::world]

    @staticmethod
    def masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """noise (B, C, N) -> ids_keep (B, C, keep): the int(N*(1-ratio)) patches of the smallest noise, per
        sample and lead; mask (B, C, N) with 1 = masked; ids_restore (B, C, N)."""
        b, c, n = noise.shape
        keep = int(n * (1 - mask_ratio))
        ids_shuffle = noise.argsort(dim=2)
        ids_restore = ids_shuffle.argsort(dim=2)
        mask = torch.ones(b, c, n, device=noise.device)
        mask[..., :keep] = 0
        return ids_shuffle[..., :keep], torch.gather(mask, 2, ids_restore), ids_restore

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample and per lead, keep a random int(N*(1-ratio)) patches (those of the smallest noise).

        x: (B, C, N, D) -> kept (B, C, keep, D), mask (B, C, N) with 1 = masked, ids_restore (B, C, N).
        ``noise`` (B, C, N) fixes the draw (default: ``torch.rand``).
        """
        b, c, n, d = x.shape
        if noise is None:
            noise = torch.rand(b, c, n, device=x.device)
        ids_keep, mask, ids_restore = StMemMae.masking(noise, mask_ratio)
        return torch.gather(x, 2, ids_keep[..., None].expand(-1, -1, -1, d)), mask, ids_restore

    def forward_encoder(self, series: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        enc = self.encoder
        b, c, length = series.shape
        p = self.cfg.patch_size
        patches = series.reshape(b, c, length // p, p)  # (B, C, N, P)
        n = patches.shape[2]
        if noise is None:
            noise = self.masking_noise(b, c, n, series.device)
        # Mask first, then embed only the kept patches (the embedding acts on each patch alone: the same
        # tokens as embedding all N and keeping some, as the original does, at a quarter of the work).
        ids_keep, mask, ids_restore = self.masking(noise, mask_ratio)  # (B, C, keep)
        x = torch.gather(patches, 2, ids_keep[..., None].expand(-1, -1, -1, p))  # (B, C, keep, P)
        x = enc.to_patch_embedding.embed(x) + enc.pos_embedding[0, 1 : n + 1][ids_keep]  # (B, C, keep, D)
        x = enc.add_sep_and_leads(x)  # (B, C*(keep+2), D)
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        b, c, n = ids_restore.shape
        x = self.to_decoder_embedding(latent).reshape(b, c, -1, self.cfg.decoder_width)  # (B, C, keep+2, Dd)
        d = x.shape[-1]
        masks = self.mask_embedding.expand(b, c, n - (x.shape[2] - 2), d)
        patches = torch.cat([x[:, :, 1:-1], masks], dim=2)  # (B, C, N, Dd), shuffled order
        patches = torch.gather(patches, 2, ids_restore[..., None].expand(-1, -1, -1, d))
        patches = patches + self.decoder_pos_embed[:, 1 : n + 1].unsqueeze(1)
        left = x[:, :, :1] + self.decoder_pos_embed[:, :1].unsqueeze(1)
        right = x[:, :, -1:] + self.decoder_pos_embed[:, -1:].unsqueeze(1)
        x = torch.cat([left, patches, right], dim=2).reshape(b * c, n + 2, d)  # lead-wise: leads as batch
        pred = self.decode_leads(x)  # (B*C, N+2, P)
        return pred.reshape(b, c, n + 2, -1)[:, :, 1:-1]  # (B, C, N, P)

    def decode_leads(self, x: torch.Tensor) -> torch.Tensor:
        """(S, N+2, Dd) lead sequences -> (S, N+2, P): the shared decoder blocks, LayerNorm and head.

        The leads never attend to each other, so all of them go through at once (the original loops over
        the 12 leads). On the CPU in chunks of ``cpu_chunk_rows`` tokens (256 per thread at decoder width
        256, as many more as the decoder is narrower): the same results, but activations that stay in cache
        and in the allocator's pools. In one piece, the large buffers are mapped and page-faulted afresh
        every step: measured on the 2-core development machine, fp32 steps ran 1.15x (batch 16) to 1.4x
        (batch 32) slower, bf16 steps 1.1x. Chunks of 256 tokens of the tiny size's 64-wide decoder, on the
        other hand, were as slow as the original's loop over the leads (per-operation overheads).
        """
        if x.device.type == "cpu":
            per_chunk = max(1, self.cpu_chunk_rows // x.shape[1])
            if per_chunk < x.shape[0]:
                return torch.cat([self._decode(part) for part in x.split(per_chunk)])
        return self._decode(x)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_head(self.decoder_norm(x))

    def loss(self, series: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch over masked patches only; targets normalised per patch when norm_pix_loss."""
        b, c, length = series.shape
        target = series.reshape(b, c, length // self.cfg.patch_size, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:  # (target - mean) / sqrt(unbiased var + 1e-6), per patch
            centred = target - target.mean(dim=-1, keepdim=True)
            var = centred.square().sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)  # 6x torch.var's speed
            target = centred * (var + 1e-6).rsqrt()
        per_patch = (pred.float() - target).square().mean(dim=-1)  # (B, C, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, series: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        latent, mask, ids_restore = self.forward_encoder(series, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(series, pred, mask)


# --------------------------------------------------------------------------------------------------
# The family: sizes, input, objective, recipes


class StMemObjective(nn.Module):
    """ST-MEM for the training loop: ``model(batch) -> loss`` at the job's mask ratio."""

    def __init__(self, mae: StMemMae, mask_ratio: float):
        super().__init__()
        self.mae = mae
        self.mask_ratio = mask_ratio

    @property
    def encoder(self) -> StMemEncoder:
        return self.mae.encoder

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.mae(batch, self.mask_ratio)


FAMILY = Family.of(
    SPEC,
    encoder_class=StMemEncoder,
    objective=lambda cfg, params: StMemObjective(StMemMae(cfg), params.mask_ratio),
    blocks=lambda encoder: list(encoder.blocks),
    tokens=lambda encoder: encoder,
)
