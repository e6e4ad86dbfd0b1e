"""VQ-VAE heads: the codebook mechanics, and on real PTB-XL records the prototype's configuration
collapsing to one code while the token-level cosine codebook keeps most codes in use."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.datasets.cache import preprocessed
from services.datasets.ptbxl import PtbxlDataset
from services.ecg.preprocess import InputSpec
from services.models.st_mem import SIZES, StMemEncoder
from services.models.vqvae import (
    CosineCodebook,
    UsageMeter,
    VqConfig,
    VqVae,
    code_usage,
)
from services.training.loop import CropDataset, TrainConfig, train

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The prototype's configuration (methods.md section 3.2, bugs #13-#14), replicated to show its collapse:
# One code per ECG from the pooled embedding; a squared-L2 codebook that is a trainable parameter
# (init 0.1 N(0, 1), gets the codebook-loss gradient and weight decay) and is ALSO overwritten every training
# step by EMA statistics that start at zero, so every code unused in the first step becomes the zero vector;
# an MLP decoder of the whole (C, L) signal.


class OriginalEmaQuantizer(UsageMeter):
    """The prototype's ``VectorQuantizer``: squared-L2 nearest code, straight-through, and an EMA update
    (decay 0.99, eps 1e-5, Laplace smoothing) whose statistics start at ZERO and overwrite the codebook
    parameter every training step (the bug: unused codes become 0)."""

    def __init__(self, num_codes: int, dim: int, commitment: float, decay: float = 0.99, eps: float = 1e-5):
        super().__init__(num_codes)
        self.commitment, self.decay, self.eps = commitment, decay, eps
        self.codebook = nn.Parameter(0.1 * torch.randn(num_codes, dim))
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_w", torch.zeros(num_codes, dim))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (M, D) -> (straight-through z_q (M, D), codebook + commitment loss, codes (M,))."""
        z = z.float()
        codes = torch.cdist(z, self.codebook.float()).argmin(dim=1)  # (M,) squared L2 has the same argmin
        quantised = self.codebook[codes]
        if self.training:
            self.ema_update(z.detach(), codes)
        loss = F.mse_loss(quantised, z.detach()) + self.commitment * F.mse_loss(z, quantised.detach())
        return z + (quantised - z).detach(), loss, codes

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        one_hot = F.one_hot(codes, len(self.ema_count)).float()  # (M, K)
        self.ema_count.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
        n = self.ema_count.sum()
        self.ema_count.copy_((self.ema_count + self.eps) / (n + len(self.ema_count) * self.eps) * n)
        self.ema_w.mul_(self.decay).add_(one_hot.T @ z, alpha=1 - self.decay)
        self.codebook.data.copy_(self.ema_w / self.ema_count[:, None])
        self.count(codes)


class OriginalVqVae(nn.Module):
    """``EncoderVQVAE`` of the prototype: pooled embedding (B, D_enc) -> Linear -> ONE code per ECG ->
    Linear -> ReLU -> Linear to the whole (C, L) signal; loss = MSE(signal) + codebook + beta * commitment.
    Defaults: ``encoder_vqvae_big.yaml``, the configuration of the prototype's VQ run (latent 512, 1024
    codes, beta 0.05; it trained with AdamW lr 5e-3 constant, weight decay 0.05 on everything).
    ``encoder_vqvae.yaml``: latent 128, 64 codes, beta 0.1, lr 5e-4."""

    def __init__(
        self,
        encoder: nn.Module,
        encoder_dim: int,
        signal_shape: tuple[int, int] = (12, 2250),
        latent_dim: int = 512,
        num_codes: int = 1024,
        commitment: float = 0.05,
    ):
        super().__init__()
        self.signal_shape = signal_shape
        self.encoder = encoder.requires_grad_(False).eval()
        self.to_latent = nn.Linear(encoder_dim, latent_dim)
        self.quantizer = OriginalEmaQuantizer(num_codes, latent_dim, commitment)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, encoder_dim),
            nn.ReLU(),
            nn.Linear(encoder_dim, signal_shape[0] * signal_shape[1]),
        )

    def train(self, mode: bool = True) -> "OriginalVqVae":
        super().train(mode)
        self.encoder.eval()
        return self

    def latent(self, signals: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.encoder(signals)  # (B, D_enc)
        return self.to_latent(h.float())  # (B, latent)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        z_q, vq_loss, _ = self.quantizer(self.latent(signals))
        reconstruction = self.decoder(z_q).float().view(-1, *self.signal_shape)  # (B, C, L)
        return F.mse_loss(reconstruction, signals.float()) + vq_loss

    @torch.no_grad()
    def codes(self, signals: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B,) one code per ECG."""
        z = self.latent(signals).float()
        return torch.cdist(z, self.quantizer.codebook.float()).argmin(dim=1)

    def pop_usage(self) -> dict[str, float]:
        return self.quantizer.pop_usage()


def _clusters(n_clusters: int, per_cluster: int, dim: int, spread: float, seed: int) -> tuple:
    """Unit vectors around ``n_clusters`` random unit centres: (centres (n, d), points (n * per, d))."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    points = centres.repeat_interleave(per_cluster, 0) + spread * torch.randn(
        n_clusters * per_cluster, dim, generator=g
    )
    return centres, F.normalize(points, dim=1)


def test_code_usage() -> None:
    one = code_usage(torch.tensor([5.0, 0, 0, 0]))
    assert one["codes_used"] == 1 and one["usage"] == 0.25 and one["perplexity"] == pytest.approx(1.0)
    uniform = code_usage(torch.tensor([3.0, 3, 3, 3]))
    assert uniform["usage"] == 1.0 and uniform["perplexity"] == pytest.approx(4.0)
    assert code_usage(torch.zeros(4))["perplexity"] == 0.0


def test_kmeans_initialisation_finds_the_clusters() -> None:
    torch.manual_seed(0)
    centres, z = _clusters(8, 50, 16, spread=0.1, seed=0)
    codebook = CosineCodebook(8, 16).train()
    assert list(codebook.parameters()) == []  # moved by EMA only: no gradient, no weight decay
    quantised, codes = codebook(z)  # first training forward: k-means init, then one EMA step
    assert bool(codebook.initialised)
    per_cluster = codes.view(8, 50)
    assert all(len(set(row.tolist())) == 1 for row in per_cluster)  # one code per cluster ...
    assert len(set(per_cluster[:, 0].tolist())) == 8  # ... and a different one for each
    assert torch.allclose(codebook.codebook.norm(dim=1), torch.ones(8))
    assert (F.cosine_similarity(codebook.codebook[per_cluster[:, 0]], centres) > 0.98).all()
    assert codebook.pop_usage() == {"codes_used": 8, "usage": 1.0, "perplexity": pytest.approx(8.0),
                                    "assignments": 400}  # fmt: skip
    assert codebook.pop_usage()["assignments"] == 0  # reset
    assert torch.equal(quantised, codebook.codebook[codes])


def test_dead_codes_are_reseeded_from_the_batch() -> None:
    _, spread_out = _clusters(16, 20, 16, spread=0.1, seed=1)
    _, narrow = _clusters(2, 100, 16, spread=0.05, seed=2)
    used = {}
    for threshold in (0.0, 1.0):  # restarts off / on
        torch.manual_seed(0)
        codebook = CosineCodebook(16, 16, decay=0.5, dead_threshold=threshold).train()
        codebook(spread_out)  # initialised on 16 clusters
        for _ in range(10):  # then the data move to 2 other regions: most codes go unused
            codebook(narrow)
        codebook.pop_usage()
        codebook(narrow)
        used[threshold] = codebook.pop_usage()["codes_used"]
        stale = codebook.ema_count < 1.0
        assert not stale.any() if threshold else stale.sum() >= 8
    # restarted codes are vectors of the current batch, so they take part in quantising it
    assert used[0.0] <= 4 and used[1.0] >= 12, used  # measured: 3 and 16


def test_original_ema_overwrites_unused_codes_with_zero() -> None:
    """methods.md section 3.2: with zero-initialised EMA statistics every code not chosen in the first
    step becomes the zero vector, and on zero-mean inputs the next step maps everything to one code."""
    torch.manual_seed(0)
    quantizer = OriginalEmaQuantizer(64, 128, commitment=0.1).train()
    z1, z2 = torch.randn(64, 128), torch.randn(64, 128)
    _, _, codes = quantizer(z1)
    chosen = torch.zeros(64, dtype=torch.bool)
    chosen[codes.unique()] = True
    assert int(chosen.sum()) > 20  # measured: 43 codes in the first step
    assert (quantizer.codebook[~chosen] == 0).all() and (quantizer.codebook[chosen] != 0).any(dim=1).all()
    _, _, codes = quantizer(z2)
    assert len(codes.unique()) == 1


def test_tokens_are_quantised_one_code_each() -> None:
    torch.manual_seed(0)
    model = VqVae(StMemEncoder(SIZES["tiny"]), SIZES["tiny"].width, 75, VqConfig(num_codes=32, code_dim=8))
    x = torch.randn(3, 12, 2250)
    loss = model(x)
    loss.backward()
    assert model.to_code[1].weight.grad is not None and model.decoder[0].weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen
    assert model.codes(x).shape == (3, 12, 30) and model.embed(x).shape == (3, 8)
    assert model.pop_usage()["assignments"] == 3 * 12 * 30  # counted in training mode only
    model.eval()
    model(x)
    assert model.pop_usage()["assignments"] == 0


# --------------------------------------------------------------------------------------------------
# Real records


@pytest.fixture(scope="module")
def windows(ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """(signals (500, 12, 2500), folds (500,)) of the real PTB-XL records at 250 Hz."""
    dataset = PtbxlDataset(ptbxl_dir)
    cache = preprocessed(
        dataset, {"path": str(ptbxl_dir)}, InputSpec(), tmp_path_factory.getbasetemp() / "ptbxl-cache"
    )
    return np.asarray(cache.signals), cache.folds[cache.record_index]


def _train(model: torch.nn.Module, data: CropDataset, cfg: TrainConfig, path: Path) -> list[dict]:
    usage = []
    result = train(
        model, data, cfg, CPU, path, on_epoch=lambda epoch, metrics: usage.append(model.pop_usage())
    )
    return [{**row, **stats} for row, stats in zip(result.history, usage, strict=True)]


def test_original_collapses_and_ours_keeps_the_codebook_in_use(windows, tmp_path: Path) -> None:
    signals, folds = windows
    train_set = CropDataset(signals, 2250, random_crop=True, indices=np.flatnonzero(folds <= 8)[:128])
    held = CropDataset(signals, 2250, random_crop=False, indices=np.flatnonzero(folds >= 9)[:32])
    held_out = torch.stack([held[i] for i in range(len(held))])  # (32, 12, 2250)
    num_codes = 1024

    # The prototype's encoder_vqvae_big.yaml (the one its VQ run used): latent 512, 1024 codes, beta 0.05,
    # AdamW lr 5e-3 constant, weight decay 0.05 (on the codebook too); batch 32 here, 8 steps.
    torch.manual_seed(0)
    original = OriginalVqVae(StMemEncoder(SIZES["tiny"]), 64)  # defaults: encoder_vqvae_big.yaml
    constant = {"warmup_epochs": 0, "amp": False}
    cfg = TrainConfig(epochs=2, batch_size=32, learning_rate=5e-3, min_lr=5e-3, weight_decay=0.05, **constant)
    original_history = _train(original, train_set, cfg, tmp_path / "original.pt")
    original.eval()
    original_held = code_usage(torch.bincount(original.codes(held_out), minlength=num_codes))
    # measured: 1 code for all 32 held-out ECGs; the training epochs used 2, then 1 code. (Encoder seeds
    # 0-7, 8 steps of 64: 2-7 codes in the first step, 1 code on held-out records after the eighth.)
    assert original_held["codes_used"] == 1, original_held
    assert original_history[-1]["codes_used"] <= 2, original_history

    # Ours, same encoder and codebook size: per token, cosine codes of dimension 16, EMA + k-means init +
    # dead-code restart; batch 16, 16 steps.
    torch.manual_seed(0)
    ours = VqVae(
        StMemEncoder(SIZES["tiny"]), 64, 75, VqConfig(num_codes=num_codes, code_dim=16, decoder_hidden=128)
    )
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=2e-3, min_lr=2e-3, weight_decay=0.01, **constant)
    history = _train(ours, train_set, cfg, tmp_path / "ours.pt")
    ours.eval()
    held_codes = ours.codes(held_out)  # (32, 12, 30)
    ours_held = code_usage(torch.bincount(held_codes.flatten(), minlength=num_codes))
    # measured: held-out usage 0.80 (819 codes), perplexity 267; training epochs usage 1.00 / 0.98,
    # perplexity 738 / 435
    assert ours_held["usage"] > 0.2 and ours_held["perplexity"] > 50, ours_held
    assert all(row["usage"] > 0.2 for row in history), history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    print(f"\noriginal: held-out {original_held}, history {original_history}")
    print(f"ours: held-out {ours_held}, history {history}")
