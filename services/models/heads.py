"""Diagnosis heads on an ECG encoder, and the wrappers that make any downstream model exportable.

    signals (B, C, L) --encoder--> embedding (B, D) --standardise (fixed), Linear D -> K--> logits (B, K)
    --sigmoid--> probabilities (B, K)   (multi-label: one independent probability per class)

``DiagnosisModel.forward`` returns (embedding, probabilities), the two outputs of the exported graph
(``services.export.onnx.HEAD_OUTPUTS``). Training goes through ``MultiLabelLoss``: ``model(batch) -> BCE``
on the logits, for the one training loop. A linear probe trains the ``LinearHead`` alone on features
computed once, then is joined to its frozen encoder for export; ``Embedder`` exports the ``embed`` of a
triplet or VQ-VAE model.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.models.triplet import LabelledBatch


class LinearHead(nn.Module):
    """features (B, D) -> logits (B, K): (x - mean) / std with fixed statistics, then one Linear layer."""

    def __init__(
        self, dim: int, num_classes: int, mean: np.ndarray | None = None, std: np.ndarray | None = None
    ):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean).float())
        self.register_buffer("std", torch.ones(dim) if std is None else torch.as_tensor(std).float())
        self.linear = nn.Linear(dim, num_classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)  # (B, K)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)


class DiagnosisModel(nn.Module):
    """Encoder + linear head; ``forward(signals) -> (embedding (B, D), probabilities (B, K))``."""

    def __init__(self, encoder: nn.Module, head: LinearHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def logits(self, signals: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.encoder(signals))  # (B, K)

    def forward(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(signals)  # (B, D)
        return embedding, torch.sigmoid(self.head.logits(embedding))

    def probabilities(self, signals: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(signals))

    def embed(self, signals: torch.Tensor) -> torch.Tensor:
        return self.encoder(signals)


class EnsembleDiagnosis(nn.Module):
    """K diagnosis models served as one: ``forward(signals) -> (embedding (B, K * D), probabilities (B, C))``,
    the members' embeddings side by side and the mean of their probabilities."""

    def __init__(self, members: list[DiagnosisModel]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def embed(self, signals: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.encoder(signals) for m in self.members], dim=-1)  # (B, K * D)

    def probabilities(self, signals: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.probabilities(signals) for m in self.members]).mean(dim=0)  # (B, C)

    def forward(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [m(signals) for m in self.members]
        embedding = torch.cat([e for e, _ in outputs], dim=-1)
        return embedding, torch.stack([p for _, p in outputs]).mean(dim=0)


class MultiLabelLoss(nn.Module):
    """``loss(batch)``: binary cross-entropy of ``model.logits(batch.signals)`` against the multi-hot labels
    (sigmoid per class, as ST-MEM's ``bce`` loss); ``batch`` is a ``LabelledBatch``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: LabelledBatch) -> torch.Tensor:
        logits = self.model.logits(batch.signals).float()
        return F.binary_cross_entropy_with_logits(logits, batch.labels.float())


class Embedder(nn.Module):
    """``model.embed`` as the forward of a module, for export: (B, C, L) -> (B, E)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.model.embed(signals)
