"""Triplet loss, P x K batches and the triplet head: hand-made embeddings, then real PTB-XL records."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from services.datasets.cache import preprocessed
from services.datasets.ptbxl import SUPERCLASSES, PtbxlDataset
from services.ecg.preprocess import InputSpec
from services.evaluation.linear_probe import macro_auroc
from services.evaluation.metrics import knn_evaluation, knn_scores
from services.models.ecg_jepa import SIZES as JEPA_SIZES
from services.models.ecg_jepa import EcgJepaEncoder
from services.models.st_mem import SIZES, StMemConfig, StMemEncoder
from services.models.triplet import (
    LabelledBatch,
    LabelledRecords,
    PKBatches,
    TripletModel,
    embed_all,
    label_masks,
    pk_batches,
    triplet_loss,
)
from services.training.loop import CropDataset, TrainConfig, train

MININGS = ("batch_hard", "semi_hard", "batch_all")
ENCODER = StMemConfig(width=32, depth=1, heads=2, dim_head=16, mlp_dim=64)  # random weights: fast


# --------------------------------------------------------------------------------------------------
# The loss on hand-made embeddings


def test_zero_when_every_margin_is_met() -> None:
    # two classes on orthogonal unit vectors: d(a, p) = 0, d(a, n) = sqrt(2) > 0.2
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    for mining in MININGS:
        for metric in ("euclidean", "cosine"):
            assert triplet_loss(e, labels, 0.2, mining, metric).item() == pytest.approx(0.0, abs=1e-5)


def test_margin_when_everything_coincides_and_positive_when_classes_overlap() -> None:
    e = torch.ones(6, 3) / 3**0.5  # one point: d(a, p) = d(a, n) = 0 -> loss = margin
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for mining in MININGS:
        assert triplet_loss(e, labels, 0.3, mining).item() == pytest.approx(0.3, abs=1e-4)
    # each class's two members far apart, a negative next to each. Distances: d(0,1) = 1.414,
    # d(2,3) = 1.266, d(0,2) = d(1,3) = 0.0996, d(0,3) = d(1,2) = 1.342.
    e = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    hard = [1.414 - 0.0996 + 0.2] * 2 + [1.266 - 0.0996 + 0.2] * 2  # per anchor: nearest negative
    assert triplet_loss(e, labels, 0.2, "batch_hard").item() == pytest.approx(np.mean(hard), abs=1e-3)
    # semi-hard: for class 0 no negative lies beyond 1.414, so the farthest (1.342) is taken; for class 1
    # the nearest beyond 1.266 is 1.342
    semi = [1.414 - 1.342 + 0.2] * 2 + [1.266 - 1.342 + 0.2] * 2
    assert triplet_loss(e, labels, 0.2, "semi_hard").item() == pytest.approx(np.mean(semi), abs=1e-3)
    # batch-all: the mean over both negatives of every anchor
    every = [1.414 - 0.0996 + 0.2, 1.414 - 1.342 + 0.2, 1.266 - 0.0996 + 0.2, 1.266 - 1.342 + 0.2]
    assert triplet_loss(e, labels, 0.2, "batch_all").item() == pytest.approx(np.mean(every), abs=1e-3)


def _brute_force(e: torch.Tensor, labels: list[int], margin: float, mining: str) -> torch.Tensor:
    """Per-anchor (batch-hard), per-pair (semi-hard) or all (batch-all) triplets by explicit loops,
    scored by torch's ``triplet_margin_loss`` on (1, E) tensors."""
    d = torch.cdist(e, e)
    n, losses = len(labels), []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [m for m in range(n) if labels[m] != labels[a]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            pairs = [(max(positives, key=lambda p: d[a, p]), min(negatives, key=lambda m: d[a, m]))]
        elif mining == "batch_all":
            pairs = list(itertools.product(positives, negatives))
        else:
            pairs = []
            for p in positives:
                farther = [m for m in negatives if d[a, m] > d[a, p]]
                pick = (
                    min(farther, key=lambda m: d[a, m]) if farther else max(negatives, key=lambda m: d[a, m])
                )
                pairs.append((p, pick))
        for p, m in pairs:
            losses.append(
                F.triplet_margin_loss(e[a : a + 1], e[p : p + 1], e[m : m + 1], margin=margin, eps=0)
            )
    return torch.stack(losses).mean()


def test_matches_explicit_triplets_and_gradient_flows() -> None:
    torch.manual_seed(0)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]  # class 3 has no positive: skipped as an anchor
    for mining in MININGS:
        e = F.normalize(torch.randn(10, 8), dim=1).requires_grad_(True)
        loss = triplet_loss(e, torch.tensor(labels), 0.2, mining)
        assert loss.item() == pytest.approx(_brute_force(e.detach(), labels, 0.2, mining).item(), abs=1e-5)
        loss.backward()
        assert torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0
        with torch.no_grad():  # a step against the gradient lowers the loss
            stepped = e - 0.05 * e.grad
        assert triplet_loss(stepped, torch.tensor(labels), 0.2, mining) < loss


def test_multi_hot_labels_share_a_class_to_be_positives() -> None:
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    positive, negative = label_masks(labels)
    assert positive[0].tolist() == [False, True, False, False, False]
    assert positive[1].tolist() == [True, False, True, False, False]
    assert negative[0].tolist() == [False, False, True, True, True]
    assert not (positive & negative).any() and not positive.diagonal().any()
    assert not positive[4].any()  # a record without a class has no positive


# --------------------------------------------------------------------------------------------------
# P x K batches


def test_pk_batches_are_class_balanced() -> None:
    rng = np.random.default_rng(0)
    single = rng.choice(4, 300, p=[0.7, 0.2, 0.08, 0.02])  # class 3: 6 records
    labels = np.eye(4)[single]
    labels[:20, 1] = 1  # a few records with two classes
    batches = pk_batches(labels, p=3, k=5, n_batches=200, rng=np.random.default_rng(1))
    drawn = np.zeros(4)
    for batch in batches:
        assert batch.shape == (15,) and len(set(batch.tolist())) == 15  # no record twice
        for group in batch.reshape(3, 5):  # K records that all carry the class they were drawn for
            shared = [c for c in range(4) if labels[group, c].all()]
            assert shared
            drawn[shared] += 1  # (a group of two-class records would count for both: rare)
    # each class is drawn in 3/4 of the batches, the rare one as often as the common one
    assert np.all(np.abs(drawn / 200 - 0.75) < 0.1), drawn


def test_pk_dataset_through_a_data_loader() -> None:
    signals = torch.randn(40, 12, 2250)
    labels = np.eye(4)[np.arange(40) % 4]
    data = PKBatches(LabelledRecords(signals, labels), p=2, k=3, n_batches=5, seed=3)
    batch = next(iter(DataLoader(data, batch_size=1)))
    assert isinstance(batch, LabelledBatch)
    assert batch.signals.shape == (1, 6, 12, 2250) and len(batch) == 6  # the loop counts records
    flat = batch.to("cpu").flat()
    assert flat.signals.shape == (6, 12, 2250) and flat.labels.shape == (6, 4)
    first = [b.copy() for b in data.batches]
    data.set_epoch(1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, data.batches, strict=True))
    data.set_epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, data.batches, strict=True))


def test_pk_batches_train_and_validate_in_the_loop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    labels = np.eye(3)[np.arange(24) % 3]
    records = LabelledRecords(torch.randn(24, 12, 2250), labels)
    train_set = PKBatches(records, p=3, k=4, n_batches=2, seed=0)
    val_set = PKBatches(records, p=3, k=4, n_batches=1, seed=1)
    model = TripletModel(StMemEncoder(ENCODER), ENCODER.width, embedding_dim=8, hidden_dim=16)
    cfg = TrainConfig(epochs=2, batch_size=1, learning_rate=1e-3, warmup_epochs=0, amp=False)
    history = train(model, train_set, cfg, torch.device("cpu"), tmp_path / "c.pt", val_set=val_set).history
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(np.isfinite(row["val_loss"]) and row["train_loss"] > 0 for row in history)


def test_only_the_last_blocks_train() -> None:
    encoder = StMemEncoder(SIZES["tiny"])
    frozen = TripletModel(encoder, 64, embedding_dim=16)
    assert not any(p.requires_grad for p in encoder.parameters())
    frozen.train()
    assert not encoder.training and frozen.head.training

    encoder = StMemEncoder(SIZES["tiny"])
    tuned = TripletModel(encoder, 64, embedding_dim=16, trainable_blocks=1)
    trainable = {n.split(".")[0] for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"block1", "norm"}
    tuned.train()
    assert encoder.training
    x = LabelledBatch(torch.randn(1, 6, 12, 2250), torch.eye(3).repeat_interleave(2, 0)[None])
    tuned(x).backward()
    assert (
        encoder.block1.ff.fn.net[0].weight.grad is not None
        and encoder.block0.attn.fn.to_qkv.weight.grad is None
    )


def test_only_the_last_blocks_train_on_ecg_jepa() -> None:
    # ECG-JEPA keeps its blocks at encoder_blocks.blocks (the official layout), not at .blocks
    encoder = EcgJepaEncoder(JEPA_SIZES["tiny"])
    tuned = TripletModel(encoder, 64, embedding_dim=16, trainable_blocks=1)
    trainable = {".".join(n.split(".")[:3]) if n.startswith("encoder_blocks") else n.split(".")[0]
                 for n, p in encoder.named_parameters() if p.requires_grad}  # fmt: skip
    assert trainable == {"encoder_blocks.blocks.1", "norm"}
    tuned.train()
    assert encoder.training
    x = LabelledBatch(torch.randn(1, 6, 8, 2500), torch.eye(3).repeat_interleave(2, 0)[None])
    tuned(x).backward()
    blocks = encoder.encoder_blocks.blocks
    assert blocks[1].mlp.fc1.weight.grad is not None and blocks[0].attn.qkv.weight.grad is None
    assert encoder.W_P.weight.grad is None
    # every block at most: asking for more blocks than the encoder has unfreezes them all
    encoder = EcgJepaEncoder(JEPA_SIZES["tiny"])
    TripletModel(encoder, 64, embedding_dim=16, trainable_blocks=5)
    assert all(p.requires_grad for p in encoder.encoder_blocks.parameters())


# --------------------------------------------------------------------------------------------------
# Real records


@pytest.fixture(scope="module")
def records(
    ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signals (500, 12, 2500) at 250 Hz, labels (500, 5), folds (500,)) of the real PTB-XL records."""
    dataset = PtbxlDataset(ptbxl_dir)
    cache = preprocessed(
        dataset, {"path": str(ptbxl_dir)}, InputSpec(), tmp_path_factory.getbasetemp() / "ptbxl-cache"
    )
    return np.asarray(cache.signals), cache.labels[cache.record_index], cache.folds[cache.record_index]


def train_on_pk_batches(
    model: TripletModel,
    signals: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    epochs: int,
    checkpoint: Path,
) -> list[float]:
    """Train ``model`` through the loop on 5 x 8 class-balanced batches of random crops of ``rows``; the
    per-epoch losses."""
    train_set = PKBatches(
        LabelledRecords(CropDataset(signals, 2250, random_crop=True, indices=rows), labels[rows]), p=5, k=8
    )
    cfg = TrainConfig(epochs=epochs, batch_size=1, learning_rate=1e-3, warmup_epochs=1, amp=False)
    return [
        row["train_loss"] for row in train(model, train_set, cfg, torch.device("cpu"), checkpoint).history
    ]


def test_triplet_training_on_real_records(records, tmp_path: Path) -> None:
    signals, labels, folds = records
    train_rows = np.flatnonzero((folds <= 8) & (labels.sum(1) > 0))
    val_rows, test_rows = np.flatnonzero(folds == 9), np.flatnonzero(folds == 10)
    held_rows = np.concatenate([val_rows, test_rows])

    def centre(rows: np.ndarray) -> CropDataset:
        return CropDataset(signals, 2250, random_crop=False, indices=rows)

    def knn(embed) -> tuple[float, float]:
        """(macro AUROC on folds 9-10, macro F1 on fold 10 at thresholds tuned on fold 9), kNN k=20."""
        rows = {"train": train_rows, "val": val_rows, "test": test_rows, "held": held_rows}
        e = {name: embed_all(embed, centre(r)) for name, r in rows.items()}
        auroc = macro_auroc(labels[held_rows], knn_scores(e["train"], labels[train_rows], e["held"], k=20))[0]
        split = [
            (e[n], labels[r]) for n, r in (("train", train_rows), ("val", val_rows), ("test", test_rows))
        ]
        return auroc, knn_evaluation(*split[0], *split[1], *split[2], SUPERCLASSES, k=20).macro_f1

    torch.manual_seed(0)
    encoder = StMemEncoder(ENCODER).eval()  # random weights, frozen
    before = knn(encoder)
    model = TripletModel(encoder, ENCODER.width, embedding_dim=64, hidden_dim=256, mining="batch_all")
    losses = train_on_pk_batches(model, signals, labels, train_rows, 20, tmp_path / "triplet.pt")
    model.eval()
    after = knn(model.embed)
    print(f"\ntriplet losses {np.round(losses, 3)}; kNN (AUROC, F1) before {before}, after {after}")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # Measured (seed 0): loss 0.181 -> 0.165 per epoch; held-out kNN macro AUROC 0.688 -> 0.695. Encoder
    # seeds 0-3: +0.007, +0.016, +0.003, +0.053. Small gains: 400 records, random-encoder features.
    assert after[0] >= before[0], (before, after)


def test_semi_hard_triplet_loss_falls_on_real_records(records, tmp_path: Path) -> None:
    """Semi-hard mining (the issue's alternative to batch-hard) trains on the real records too. It is not the
    default: on this setup it raised the held-out kNN macro AUROC less than batch-all (module docstring)."""
    signals, labels, folds = records
    train_rows = np.flatnonzero((folds <= 8) & (labels.sum(1) > 0))
    torch.manual_seed(0)
    model = TripletModel(StMemEncoder(ENCODER).eval(), ENCODER.width, embedding_dim=64, mining="semi_hard")
    losses = train_on_pk_batches(model, signals, labels, train_rows, 8, tmp_path / "semi_hard.pt")
    print(f"\nsemi-hard triplet losses {np.round(losses, 3)}")
    # measured (encoder seed 0): 0.184 0.150 0.133 0.141 0.135 0.133 0.135 0.136, i.e. 0.156 -> 0.135
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.005, losses
