"""Triplet-loss metric head on an ECG encoder, trained with the one training loop.

    signals (B, C, T) --encoder (frozen, or its last k blocks trainable)--> (B, D)
    --MLP D -> hidden -> E, L2-normalise--> (B, E) unit vectors
    --triplet loss over the batch (batch-all, batch-hard or semi-hard mining), margin 0.2--> loss

The prototype mined random triplets and stacked positives as (N, 1, 9) against (N, 9) anchors, so the
"triplet" loss broadcast to an all-anchors-vs-one-positive sum (methods.md section 6, #3). Here the loss
works on (N, E) embeddings and an (N, N) distance matrix, and batches are class-balanced: P classes x K
records each (``PKBatches``), so that every anchor has positives and negatives.

Default mining is batch-all: on small labelled sets it was the one of the three that improved a frozen
encoder's kNN AUROC (batch-hard collapsed the embeddings); the comparison is in ``reports/design_notes.md``.

Batches carry labels: ``LabelledBatch`` (signals, labels) is a named tuple with ``to(device)``, so the loop's
``batch.to(device)`` works and the default collate keeps its type. ``PKBatches`` yields one whole P x K
batch per item; train it with ``TrainConfig(batch_size=1)`` (one P x K batch per step; under torchrun,
batch_size = number of processes) -- the model flattens the leading loader dimension.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

# --------------------------------------------------------------------------------------------------
# Loss


def pairwise_distances(x: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(N, E) -> (N, N): Euclidean (0..2 on unit vectors) or cosine distance 1 - cos (0..2)."""
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        return 1.0 - x @ x.T
    if metric == "euclidean":
        squared = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
        return squared.clamp_min(1e-12).sqrt()  # clamp: finite gradient at 0 (the diagonal)
    raise ValueError(f"unknown metric {metric!r}: 'euclidean' or 'cosine'")


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) (N, N) bool masks. labels: (N,) class ids, or (N, K) multi-hot where two
    records are positives when they share a class and negatives when they share none. i is never its
    own positive."""
    if labels.dim() == 1:
        same = labels[:, None] == labels[None, :]
        different = ~same
    else:
        shared = labels.float() @ labels.float().T  # (N, N) number of classes in common
        same, different = shared > 0, shared == 0
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, different & ~eye


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    mining: str = "batch_hard",
    metric: str = "euclidean",
) -> torch.Tensor:
    """Mean hinge max(0, d(a, p) - d(a, n) + margin) over the triplets that ``mining`` picks in the batch.

    embeddings (N, E) (L2-normalise them first for the default margin); labels (N,) or (N, K) multi-hot.
    - ``batch_hard`` (Hermans et al. 2017): per anchor, its farthest positive and nearest negative;
    - ``semi_hard`` (Schroff et al. 2015): per positive pair (a, p), the nearest negative farther than p
      (d(a, n) > d(a, p)); where there is none, the farthest negative;
    - ``batch_all`` (Hermans et al. 2017): the mean over every valid (a, p, n) of the batch.
    Anchors (pairs) without a positive or without a negative are skipped; 0 (with gradient) if none is left.
    """
    d = pairwise_distances(embeddings, metric)  # (N, N)
    positive, negative = label_masks(labels)
    if mining == "batch_hard":
        valid = positive.any(1) & negative.any(1)  # (N,)
        hardest_positive = d.masked_fill(~positive, float("-inf")).amax(1)  # (N,)
        hardest_negative = d.masked_fill(~negative, float("inf")).amin(1)  # (N,)
        hinge = F.relu(hardest_positive - hardest_negative + margin)[valid]
    elif mining == "semi_hard":
        d_ap = d[:, :, None]  # (N, N, 1): anchor a, positive p
        d_an = d[:, None, :]  # (N, 1, N): anchor a, negative n
        farther = negative[:, None, :] & (d_an > d_ap)  # (N, N, N)
        semi_hard = d_an.masked_fill(~farther, float("inf")).amin(2)  # (N, N)
        easiest = d.masked_fill(~negative, float("-inf")).amax(1, keepdim=True).expand_as(d)  # (N, N)
        chosen = torch.where(farther.any(2), semi_hard, easiest)
        valid = positive & negative.any(1, keepdim=True)  # (N, N) pairs
        hinge = F.relu(d - chosen + margin)[valid]
    elif mining == "batch_all":
        valid = positive[:, :, None] & negative[:, None, :]  # (N, N, N): anchor, positive, negative
        hinge = F.relu(d[:, :, None] - d[:, None, :] + margin)[valid]
    else:
        raise ValueError(f"unknown mining {mining!r}: 'batch_hard', 'semi_hard' or 'batch_all'")
    if hinge.numel() == 0:
        return embeddings.sum() * 0.0
    return hinge.mean()


# --------------------------------------------------------------------------------------------------
# Batches


class LabelledBatch(NamedTuple):
    """Signals (..., C, T) and multi-hot labels (..., K); ``len`` is the number of records."""

    signals: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LabelledBatch":
        return LabelledBatch(
            self.signals.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:  # the training loop counts records with len(batch)
        return self.labels.shape[:-1].numel()

    def flat(self) -> "LabelledBatch":
        """Loader batches of P x K batches (L, PK, C, T) -> (L * PK, C, T), labels likewise."""
        return LabelledBatch(
            self.signals.reshape(-1, *self.signals.shape[-2:]), self.labels.reshape(-1, self.labels.shape[-1])
        )


class LabelledRecords(Dataset):
    """Records with labels, one ``LabelledBatch`` per item (e.g. to embed, or for a plain loader).

    ``signals``: a dataset of (C, T) tensors (e.g. ``CropDataset``), ``labels``: (len(signals), K).
    """

    def __init__(self, signals: Dataset, labels: np.ndarray):
        if len(signals) != len(labels):
            raise ValueError(f"{len(signals)} signals but {len(labels)} label rows")
        self.signals = signals
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.signals, "set_epoch"):
            self.signals.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.signals)

    def __getitem__(self, i: int) -> LabelledBatch:
        return LabelledBatch(self.signals[i], self.labels[i])


def pk_batches(
    labels: np.ndarray, p: int, k: int, n_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``n_batches`` arrays of P*K record indices: P classes drawn uniformly (without replacement), then K
    records carrying each (without replacement where the class has K left, else with), no record twice
    in a batch where avoidable. labels: (N, K) multi-hot; classes with fewer than 2 records never drawn."""
    members = [np.flatnonzero(labels[:, c] > 0) for c in range(labels.shape[1])]
    eligible = [c for c, m in enumerate(members) if len(m) >= 2]
    if len(eligible) < 2:
        raise ValueError("P x K batches need at least two classes with two records each")
    p = min(p, len(eligible))
    batches = []
    for _ in range(n_batches):
        batch: list[np.ndarray] = []
        for c in rng.choice(eligible, size=p, replace=False):
            pool = np.setdiff1d(members[c], batch) if batch else members[c]  # not yet in the batch
            if len(pool) < k:
                pool = members[c]
            batch.extend(rng.choice(pool, size=k, replace=len(pool) < k))
        batches.append(np.array(batch))
    return batches


class PKBatches(Dataset):
    """Class-balanced P x K batches of a labelled record dataset; one item = one ``LabelledBatch`` of
    (P*K, C, T) signals and (P*K, K) labels.

    A new draw every epoch (``set_epoch``, called by the training loop; a function of (seed, epoch)). An
    epoch holds ``n_batches`` batches, by default about one pass over the labelled records. For a fixed
    validation set, leave it at epoch 0 (the loop calls ``set_epoch`` on the training set only).
    """

    def __init__(self, records: LabelledRecords, p: int, k: int, n_batches: int | None = None, seed: int = 0):
        self.records = records
        self.labels = records.labels.numpy()
        self.p, self.k, self.seed = p, k, seed
        labelled = int((self.labels.sum(1) > 0).sum())
        self.n_batches = n_batches or max(1, labelled // (p * k))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.records.set_epoch(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        self.batches = pk_batches(self.labels, self.p, self.k, self.n_batches, rng)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> LabelledBatch:
        items = [self.records[int(j)] for j in self.batches[i]]
        return LabelledBatch(torch.stack([b.signals for b in items]), torch.stack([b.labels for b in items]))


# --------------------------------------------------------------------------------------------------
# Model


def transformer_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's transformer blocks in order: ST-MEM's ``blocks`` (``block0``, ``block1``...), ECG-JEPA's
    ``encoder_blocks.blocks`` (the official checkpoint layout)."""
    if isinstance(getattr(encoder, "encoder_blocks", None), nn.Module):
        return list(encoder.encoder_blocks.blocks)
    if hasattr(encoder, "blocks"):
        return list(encoder.blocks)
    raise ValueError(f"{type(encoder).__name__} has no transformer blocks to unfreeze")


def last_blocks(encoder: nn.Module, k: int) -> list[nn.Module]:
    """The modules to unfreeze for the last ``k`` blocks (all of them where ``k`` exceeds the depth) and the
    final ``norm`` after them where the encoder has one (ST-MEM, ECG-JEPA)."""
    if k <= 0:
        return []
    modules = transformer_blocks(encoder)[-k:]
    norm = getattr(encoder, "norm", None)
    return modules + ([norm] if isinstance(norm, nn.Module) else [])


class TripletModel(nn.Module):
    """Encoder + projection head to unit ``embedding_dim`` vectors; ``model(batch) -> triplet loss``.

    encoder: (B, C, T) -> (B, encoder_dim). It is frozen (kept in eval mode, run without gradients)
    except the modules ``unfreeze(encoder, trainable_blocks)`` returns (default ``last_blocks``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        encoder_dim: int,
        embedding_dim: int = 128,
        hidden_dim: int = 256,
        margin: float = 0.2,
        mining: str = "batch_all",
        metric: str = "euclidean",
        trainable_blocks: int = 0,
        unfreeze: Callable[[nn.Module, int], Sequence[nn.Module]] = last_blocks,
    ):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(encoder_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embedding_dim)
        )
        self.margin, self.mining, self.metric = margin, mining, metric
        encoder.requires_grad_(False)
        for module in unfreeze(encoder, trainable_blocks):
            module.requires_grad_(True)
        self.encoder_frozen = not any(p.requires_grad for p in encoder.parameters())
        self.train()

    def train(self, mode: bool = True) -> "TripletModel":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()  # no dropout/drop-path in a frozen encoder
        return self

    def embed(self, signals: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, E) unit vectors."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            h = self.encoder(signals)  # (B, D)
        return F.normalize(self.head(h.float()).float(), dim=-1)  # fp32 even under autocast

    def forward(self, batch: LabelledBatch) -> torch.Tensor:
        batch = batch.flat()  # (PK, C, T), (PK, K)
        return triplet_loss(self.embed(batch.signals), batch.labels, self.margin, self.mining, self.metric)


@torch.no_grad()
def embed_all(
    embed: Callable[[torch.Tensor], torch.Tensor], signals: Dataset, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """(N, E) float32 embeddings of a dataset of (C, T) tensors (or ``LabelledBatch`` items)."""
    out = []
    for start in range(0, len(signals), batch_size):
        items = [signals[i] for i in range(start, min(start + batch_size, len(signals)))]
        x = torch.stack([item.signals if isinstance(item, LabelledBatch) else item for item in items])
        out.append(embed(x.to(device)).float().cpu())
    return torch.cat(out).numpy()
