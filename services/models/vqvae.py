"""Token-level VQ-VAE head on an ECG encoder.

``VqVae`` (ours), per patch token of the encoder:

    signals (B, C, L) --encoder.forward_tokens (frozen)--> tokens (B, C, N, D)
    --LayerNorm, Linear D -> d, L2-normalise--> z (B, C, N, d) on the unit sphere
    --nearest code by cosine (CosineCodebook: EMA, k-means init, dead-code restart)--> z_q, codes (B, C, N)
    --MLP decoder--> patches (B, C, N, P), compared with the per-patch normalised input patches
    loss = MSE(reconstruction) + beta * |z - sg(z_q)|^2   (straight-through gradient to z)

The codebook is a buffer, moved only by its EMA (no gradient, no weight decay). Usage: ``pop_usage()`` after
an epoch (e.g. from the loop's ``on_epoch``) returns the fraction of codes used and the perplexity of the
training assignments since the last call, and resets them.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.cluster import kmeans_plusplus
from torch import nn

# the config lives in vqvae_spec (torch-free); importable here too
from services.models.vqvae_spec import VqConfig as VqConfig


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def code_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage of a codebook from per-code assignment counts (K,): codes used, their fraction, perplexity
    (exp of the entropy of the assignment distribution: 1 = one code, K = all codes equally)."""
    total = float(counts.sum())
    probs = counts.double() / max(total, 1.0)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    used = int((counts > 0).sum())
    return {
        "codes_used": used,
        "usage": used / len(counts),
        "perplexity": float(entropy.exp()) if total > 0 else 0.0,
        "assignments": int(total),
    }


class UsageMeter(nn.Module):
    """Counts code assignments in training mode; ``pop_usage`` returns ``code_usage`` and resets."""

    def __init__(self, num_codes: int):
        super().__init__()
        self.register_buffer("usage", torch.zeros(num_codes), persistent=False)

    @torch.no_grad()
    def count(self, codes: torch.Tensor) -> None:
        self.usage += torch.bincount(codes.flatten(), minlength=len(self.usage)).to(self.usage)

    def pop_usage(self) -> dict[str, float]:
        stats = code_usage(self.usage.cpu())
        self.usage.zero_()
        return stats


# --------------------------------------------------------------------------------------------------
# Ours


class CosineCodebook(UsageMeter):
    """K unit vectors of dimension d; nearest code = highest cosine similarity.

    Training-mode forwards update it (no gradient): on the first, spherical k-means of the batch's
    vectors initialises it; then an EMA of each code's assigned vectors (sum) and assignment count;
    a code whose EMA count falls below ``dead_threshold`` assignments per step is re-seeded with a random
    vector of the current batch. Under torchrun the statistics are summed over the processes and the
    re-seeds come from rank 0, so all processes hold the same codebook.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        dead_threshold: float = 1.0,
        kmeans_iters: int = 10,
    ):
        super().__init__(num_codes)
        self.num_codes, self.decay, self.dead_threshold, self.kmeans_iters = (
            num_codes, decay, dead_threshold, kmeans_iters,
        )  # fmt: skip
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, dim), dim=1))
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(M, d) unit vectors -> (M,) code indices."""
        return (z @ self.codebook.T).argmax(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, d) unit vectors -> (codes (M, d), indices (M,)); no gradient reaches the codebook."""
        with torch.autocast(z.device.type, enabled=False):  # similarities in fp32
            z = z.float()
            if self.training:
                self.update(z.detach())
            codes = self.nearest(z)
            return self.codebook[codes], codes

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        if not self.initialised:
            self.kmeans_init(z)
        codes = self.nearest(z)
        counts = torch.bincount(codes, minlength=self.num_codes).float()  # (K,)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, z)  # (K, d)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=1))
        self.restart_dead(z)
        self.usage += counts

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor) -> None:
        dead = self.ema_count < self.dead_threshold  # (K,)
        if not dead.any():
            return
        seeds = z[torch.randint(len(z), (int(dead.sum()),), device=z.device)]
        self.codebook[dead] = seeds
        self.ema_sum[dead] = seeds * self.dead_threshold
        self.ema_count[dead] = self.dead_threshold
        self._sync_from_rank0()

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor) -> None:
        """Spherical k-means of z (M, d): greedy k-means++ seeds (scikit-learn, on at most 32 K of the
        vectors; on unit vectors squared Euclidean = 2 (1 - cos)), then ``kmeans_iters`` Lloyd rounds by
        cosine on all of them. Fewer vectors than codes: some seeds repeat (restarts spread them later)."""
        seed = int(torch.randint(2**31 - 1, (1,)))  # from torch's RNG, so torch.manual_seed fixes it
        points = z
        if len(z) < self.num_codes:
            points = z[torch.randint(len(z), (self.num_codes,), device=z.device)]
        elif len(z) > 32 * self.num_codes:
            points = z[torch.randperm(len(z), device=z.device)[: 32 * self.num_codes]]
        seeds, _ = kmeans_plusplus(points.cpu().double().numpy(), self.num_codes, random_state=seed)
        centroids = F.normalize(torch.as_tensor(seeds, dtype=z.dtype, device=z.device), dim=1)  # (K, d)
        for _ in range(self.kmeans_iters):
            codes = (z @ centroids.T).argmax(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, codes, z)
            empty = torch.bincount(codes, minlength=self.num_codes) == 0
            centroids = torch.where(empty[:, None], centroids, F.normalize(sums, dim=1))
        counts = torch.bincount((z @ centroids.T).argmax(dim=1), minlength=self.num_codes).float()
        self.codebook.copy_(centroids)
        self.ema_count.copy_(counts.clamp_min(self.dead_threshold))
        self.ema_sum.copy_(centroids * self.ema_count[:, None])
        self.initialised.fill_(True)
        self._sync_from_rank0()

    def _sync_from_rank0(self) -> None:
        if _distributed():
            for buffer in (self.codebook, self.ema_sum, self.ema_count):
                dist.broadcast(buffer, src=0)


class VqVae(nn.Module):
    """Per-token VQ-VAE on a frozen encoder; ``model(signals (B, C, L)) -> loss``.

    The encoder provides ``forward_tokens(signals) -> (B, C, N, D)`` patch tokens aligned with the
    input's patches of ``patch_size`` samples (``StMemEncoder``: N = L / patch_size per lead).
    """

    def __init__(self, encoder: nn.Module, encoder_dim: int, patch_size: int, cfg: VqConfig = VqConfig()):
        super().__init__()
        self.cfg, self.patch_size = cfg, patch_size
        self.encoder = encoder.requires_grad_(False).eval()
        self.to_code = nn.Sequential(nn.LayerNorm(encoder_dim), nn.Linear(encoder_dim, cfg.code_dim))
        self.quantizer = CosineCodebook(
            cfg.num_codes, cfg.code_dim, cfg.decay, cfg.dead_threshold, cfg.kmeans_iters
        )
        self.decoder = nn.Sequential(
            nn.Linear(cfg.code_dim, cfg.decoder_hidden),
            nn.GELU(),
            nn.Linear(cfg.decoder_hidden, cfg.decoder_hidden),
            nn.GELU(),
            nn.Linear(cfg.decoder_hidden, patch_size),
        )

    def train(self, mode: bool = True) -> "VqVae":
        super().train(mode)
        self.encoder.eval()  # frozen
        return self

    def project(self, signals: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> z (B, C, N, d), unit vectors."""
        with torch.no_grad():
            tokens = self.encoder.forward_tokens(signals)  # (B, C, N, D)
        return F.normalize(self.to_code(tokens.float()).float(), dim=-1)

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d) -> (z_q (..., d), codes (...)); z_q carries the straight-through gradient to z."""
        q, codes = self.quantizer(z.reshape(-1, z.shape[-1]))  # (M, d), (M,)
        q, codes = q.view_as(z), codes.view(z.shape[:-1])
        return z + (q - z).detach(), codes

    def target(self, signals: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> patches (B, C, N, P), each normalised by its own mean and variance (as ST-MEM)."""
        b, c, length = signals.shape
        patches = signals.float().reshape(b, c, length // self.patch_size, self.patch_size)
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        z = self.project(signals)  # (B, C, N, d)
        z_q, _ = self.quantise(z)
        reconstruction = self.decoder(z_q).float()  # (B, C, N, P)
        commitment = (z - z_q.detach()).pow(2).sum(-1).mean()
        return F.mse_loss(reconstruction, self.target(signals)) + self.cfg.commitment * commitment

    @torch.no_grad()
    def codes(self, signals: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, C, N) code indices (no codebook update)."""
        return self.quantizer.nearest(self.project(signals).reshape(-1, self.cfg.code_dim)).view(
            signals.shape[0], signals.shape[1], -1
        )

    @torch.no_grad()
    def embed(self, signals: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, d): the mean of the record's quantised tokens."""
        codes = self.codes(signals)  # (B, C, N)
        return self.quantizer.codebook[codes].mean(dim=(1, 2))

    def pop_usage(self) -> dict[str, float]:
        return self.quantizer.pop_usage()
