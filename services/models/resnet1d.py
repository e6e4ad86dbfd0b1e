"""The convolutional family: 1-D ResNets for 12-lead ECGs (Strodthoff et al. 2021, resnet1d_wang), and
SimCLR-style contrastive pretraining with ECG augmentations (Mehari & Strodthoff 2022).

    window (B, 12, 250) at 100 Hz (2.5 s), standardised by the service
    --per-lead standardisation (inside the model)-->  (B, 12, 250)
    --stem: Conv k7 -> BN -> ReLU-->                    (B, W, 250)
    --3 basic blocks [Conv k5 -> BN -> ReLU -> Conv k3 -> BN] + shortcut, strides 1, 2, 2--> (B, W, 63)
    --concat pooling [max, mean] over time-->           (B, 2W)  = the embedding

``base`` is resnet1d_wang (W = 128, 0.47 M parameters, superdiagnostic macro AUROC 0.930 on full PTB-XL in
the reference); ``tiny`` halves the width. Each lead is standardised inside the model (its own mean and
std over the window), so a record in millivolts and the same record z-scored per lead (as many public
preprocessed sets ship) give the same embedding; the exported ONNX graph carries that step too.

Pretraining (``SimClr``): two augmented views of each window (random resized crop, time-out, per-lead gain,
Gaussian noise, random lead masking; the reference's RRC + TimeOut, two mild ones, and lead masking), the
encoder's embedding through a 2-layer projection, NT-Xent over the batch (temperature
``SimClrConfig.temperature``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.models.family import Family

# the spec lives in resnet1d_spec (torch-free); its names are importable here too
from services.models.resnet1d_spec import INPUT_SPEC as INPUT_SPEC
from services.models.resnet1d_spec import SIZES as SIZES
from services.models.resnet1d_spec import SPEC, Resnet1dConfig


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm1d(c_out),
    )


class BasicBlock(nn.Module):
    def __init__(self, channels: int, kernels: tuple[int, int], stride: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels, kernels[0], stride)
        self.conv2 = conv_bn(channels, channels, kernels[1])
        self.shortcut = conv_bn(channels, channels, 1, stride) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))  # (B, W, L / stride)
        return F.relu(out + self.shortcut(x))


def standardise_leads(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Each lead of each window to mean 0, std 1 over time; a flat lead stays (near) zero."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(eps)


class Resnet1dEncoder(nn.Module):
    """(B, C, L) standardised windows -> (B, 2W) embeddings (concat max/mean pooling)."""

    def __init__(self, cfg: Resnet1dConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.channels
        self.stem = nn.Sequential(conv_bn(cfg.num_leads, w, cfg.stem_kernel), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(w, cfg.kernels, s) for s in cfg.strides])
        for m in self.modules():  # the reference's weight_init: Kaiming conv, BN gamma 1 beta 0
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(standardise_leads(x)))  # (B, W, L / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.forward_features(x)
        return torch.cat([h.amax(dim=-1), h.mean(dim=-1)], dim=-1)  # (B, 2W)


# --------------------------------------------------------------------------------------------------
# SimCLR pretraining with ECG augmentations


@dataclass(frozen=True)
class SimClrConfig:
    temperature: float = 0.1
    projection_dim: int = 128
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: share of the window kept
    timeout: tuple[float, float] = (0.0, 0.2)  # share of the window zeroed (all leads)
    gain: tuple[float, float] = (0.7, 1.4)  # per-lead gain (log-uniform)
    noise: float = 0.05  # std of added Gaussian noise (windows are standardised: std 1)
    # random lead masking: the probability that a lead is zeroed in a view. 0.2 over none: validation probe
    # 0.872 against 0.852, fine-tune cross-fit 0.879 against 0.872 (150 epochs; 0.5 and heart-axis rotation
    # read lower: reports/cnn_pretraining_runs.md)
    lead_mask: float = 0.2


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Per sample, a random share U(scale) of the window stretched back to its length (linear)."""
    b, _, length = x.shape
    share = torch.empty(b).uniform_(*scale, generator=gen)
    start = torch.rand(b, generator=gen) * (1 - share)
    # sampling grid in [-1, 1] over the kept span, for grid_sample on (B, C, 1, L)
    t = torch.linspace(0, 1, length)
    pos = (start[:, None] + share[:, None] * t[None, :]) * 2 - 1  # (B, L)
    grid = torch.stack([pos, torch.zeros_like(pos)], dim=-1)[:, None]  # (B, 1, L, 2)
    out = F.grid_sample(x[:, :, None, :], grid.to(x), mode="bilinear", align_corners=True)
    return out[:, :, 0, :]


def augment(x: torch.Tensor, cfg: SimClrConfig, gen: torch.Generator) -> torch.Tensor:
    """One random view of each window (B, C, L)."""
    b, c, length = x.shape
    x = random_resized_crop(x, cfg.crop_scale, gen)
    span = (torch.empty(b).uniform_(*cfg.timeout, generator=gen) * length).long()
    start = (torch.rand(b, generator=gen) * (length - span + 1)).long()
    t = torch.arange(length)[None, :]
    keep = ~((t >= start[:, None]) & (t < (start + span)[:, None]))  # (B, L)
    x = x * keep[:, None, :].to(x)
    low, high = torch.log(torch.tensor(cfg.gain))
    gain = torch.exp(torch.empty(b, c, 1).uniform_(float(low), float(high), generator=gen))
    x = x * gain.to(x) + cfg.noise * torch.randn(x.shape, generator=gen).to(x)
    if cfg.lead_mask > 0:  # after the noise: a masked lead is flat, which the encoder standardises to zeros
        x = x * (torch.rand(b, c, 1, generator=gen) >= cfg.lead_mask).to(x)
    return x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its sample, 2B - 2 in-batch negatives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2B, P)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own candidate
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimClr(nn.Module):
    """``model(batch) -> loss`` for the training loop; the encoder to serve at ``.encoder``."""

    def __init__(self, encoder: Resnet1dEncoder, cfg: SimClrConfig = SimClrConfig(), seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        width = encoder.cfg.width
        self.projection = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, cfg.projection_dim)
        )
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        v1, v2 = augment(batch, self.cfg, self.generator), augment(batch, self.cfg, self.generator)
        z = self.projection(self.encoder(torch.cat([v1, v2])))  # (2B, P)
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.cfg.temperature)


# --------------------------------------------------------------------------------------------------
# The family: the spec (resnet1d_spec) with the encoder and SimCLR

FAMILY = Family.of(
    SPEC,
    encoder_class=Resnet1dEncoder,
    objective=lambda cfg, params: SimClr(Resnet1dEncoder(cfg), seed=params.seed),
    blocks=lambda encoder: [encoder.stem, *encoder.blocks],  # the stages layer-wise lr decay walks
    cpu_autocast=False,  # 1-D convolutions ran slower under bf16 autocast than in fp32 on the 2-core EPYC
)
