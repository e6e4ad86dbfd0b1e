"""The VQ-VAE head's config without torch (``services.models.vqvae`` holds the model); fine-tuning jobs
derive their ``vqvae`` options from it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class VqConfig:
    num_codes: int = 256  # codebook size
    code_dim: int = 32  # the factorised lookup dimension (ViT-VQGAN): tokens projected to it, then unit-norm
    commitment: float = 0.25  # beta
    decay: float = 0.99  # codebook EMA
    dead_threshold: float = 1.0  # EMA assignments per step under which a code is re-seeded: keep the
    # tokens per step (all processes) well above num_codes * dead_threshold, or codes churn
    kmeans_iters: int = 10
    decoder_hidden: int = 256
