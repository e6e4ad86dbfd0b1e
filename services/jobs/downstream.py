"""What fine-tuning and evaluation jobs share: the linear probe through the training loop, per-epoch logging
with extra validation metrics, kNN / clustering with their plots, and kNN reference sets."""

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.evaluation.linear_probe import macro_auroc
from services.evaluation.metrics import (
    ClassificationResult,
    clustering_evaluation,
    knn_evaluation,
    knn_scores,
)
from services.evaluation.plots import (
    Caption,
    Figures,
    plot_confusion_matrices,
    plot_embedding_map,
    plot_history,
    plot_roc_curves,
)
from services.jobs.labelled import FeatureRecords
from services.jobs.runner import JobReporter
from services.models.heads import LinearHead, MultiLabelLoss
from services.training.loop import TrainConfig, train

DOWNSTREAM_BETAS = (0.9, 0.999)  # AdamW defaults, as ST-MEM's fine-tuning (pretraining uses 0.95)


@dataclass
class EpochLog:
    """The loop's ``on_epoch``: adds ``extra(epoch)`` metrics (e.g. validation AUROC, codebook usage) to the
    loop's own (train_loss, val_loss, lr, ...), writes them to the job, and keeps the history for plots."""

    reporter: JobReporter | None
    extra: Callable[[], dict[str, float]] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, **(self.extra() if self.extra is not None else {})}
        self.history.append({"epoch": epoch, **metrics})
        if self.reporter is not None:
            self.reporter.epoch_metrics(epoch, metrics)

    def resumed(self, epoch: int) -> None:
        """The loop's ``on_resume``: the job's rows of the epochs after ``epoch`` go (they run again), and
        the history restarts from the rows kept (none without a reporter)."""
        self.history = self.reporter.resumed_from(epoch) if self.reporter is not None else []


class BestEpoch:
    """Keeps the weights of the epoch with the best ``metric`` (higher is better) in a file beside the job's
    checkpoint, so that a resumed job still knows its best epoch; ``restore`` loads them back."""

    def __init__(self, path: Path, metric: str):
        self.path, self.metric = path, metric
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        self.value = float(saved["value"]) if saved else float("-inf")
        self.epoch = int(saved["epoch"]) if saved else None

    def update(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]
        if value > self.value:
            self.value, self.epoch = value, epoch
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            partial = self.path.with_suffix(".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"value": value, "epoch": self.epoch, "state_dict": state}, partial)
            partial.replace(self.path)  # atomic: a crash never leaves half a file

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into ``model``; False when no epoch was scored."""
        if not self.path.is_file():
            return False
        model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True)["state_dict"])
        return True


class KeptWeights:
    """Weights derived from a model's trained ones, which each epoch validates and the job keeps instead of
    them (``average``: a full state dict); ``update`` runs after every step, ``description`` ends the job's
    ``kept`` note."""

    model: nn.Module
    average: dict[str, torch.Tensor]
    description: str

    def update(self) -> None:
        """Nothing to do after a step unless a subclass follows the steps."""

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the kept weights inside the block, its trained weights again after it."""
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.average)
        try:
            yield
        finally:
            self.model.load_state_dict(trained)


class WeightAverage(KeptWeights):
    """An exponential moving average of a model's weights: after every step, each floating-point tensor of its
    state (parameters and BatchNorm's running statistics) moves to ``decay * average + (1 - decay) * value``;
    integer buffers (BatchNorm's step counter) are copied. ``swapped_in`` lends the average to the model.

    The average lives beside the loop's checkpoint, not in it: a job resumed from a checkpoint starts it
    again from the resumed weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.description = f"the weights' moving average (decay {decay:g})"

    @torch.no_grad()
    def update(self) -> None:
        for name, value in self.model.state_dict().items():
            average = self.average[name]
            if (average.device, average.dtype) != (value.device, value.dtype):  # the model moved since
                average = self.average[name] = average.to(value)  # (the loop puts it on its device)
            if value.is_floating_point():
                average.lerp_(value.detach(), 1.0 - self.decay)
            else:
                average.copy_(value)


class WeightInterpolation(KeptWeights):
    """WiSE-FT (Wortsman et al. 2022): the weights ``(1 - alpha) * start + alpha * trained`` of each
    floating-point tensor of a model's state, where ``start`` is the state before fine-tuning (LP-FT: the
    pretrained encoder with the probe's head); integer buffers are the trained ones. Taken when it is asked
    for (``average``), so nothing follows the steps."""

    def __init__(self, model: nn.Module, alpha: float):
        self.model, self.alpha = model, alpha
        self.start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.description = f"WiSE-FT: {1 - alpha:g} x LP-FT's start + {alpha:g} x the fine-tuned weights"

    @property
    def average(self) -> dict[str, torch.Tensor]:
        trained = self.model.state_dict()
        return {
            k: torch.lerp(self.start[k].to(v), v.detach(), self.alpha) if v.is_floating_point() else v.clone()
            for k, v in trained.items()
        }


class LayerDecayLoss(MultiLabelLoss):
    """``MultiLabelLoss`` whose AdamW groups apply layer-wise lr decay to a transformer encoder: block i of n
    (0-based) trains at lr * decay ** (n - i), the embeddings before the blocks at decay ** (n + 1), the final
    norm and the head at the full lr; no weight decay on biases and 1-D parameters. ``blocks`` empty or
    ``decay`` 1: one group at the full lr, as without it. ``average``: updated after every step."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[nn.Module],
        decay: float,
        average: KeptWeights | None = None,
    ):
        super().__init__(model)
        self.blocks, self.decay, self.average = blocks, decay, average

    def after_step(self, step: int, total_steps: int) -> None:
        if self.average is not None:
            self.average.update()

    def param_groups(self, weight_decay: float) -> list[dict]:
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.blocks or self.decay >= 1.0:
            return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
        n = len(self.blocks)
        depth_of = {id(p): i for i, block in enumerate(self.blocks) for p in block.parameters()}
        groups: dict[tuple[float, float], list] = {}
        for name, p in trainable:
            if id(p) in depth_of:
                scale = self.decay ** (n - depth_of[id(p)])
            elif name.startswith("encoder.") and not name.startswith("encoder.norm"):
                scale = self.decay ** (n + 1)  # embeddings, tokeniser, position tables
            else:
                scale = 1.0  # final norm, head
            decay = 0.0 if p.ndim < 2 or name.endswith(".bias") else weight_decay
            groups.setdefault((scale, decay), []).append(p)
        return [{"params": ps, "lr_scale": sc, "weight_decay": wd} for (sc, wd), ps in groups.items()]


def scores_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro AUROC, NaN-safe for JSON (no class with both outcomes: 0.5)."""
    value = macro_auroc(labels, scores)[0]
    return value if np.isfinite(value) else 0.5


MIN_STD = 1e-6  # a feature whose training std is below this is constant: it is centred, not scaled


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per column of training features (N, D), std 1 for columns constant in training (as
    scikit-learn's ``StandardScaler`` and ``FeatureNormaliser.fit``): such a column (e.g. a hybrid version's
    missing-measurement flag) that differs at val, test or serve time then moves the logits by its weight,
    not by a millionfold multiple of it."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(0)
    return x.mean(0), np.where(std < MIN_STD, 1.0, std)


def fit_linear_head(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
    checkpoint: Path,
    reporter: JobReporter | None = None,
) -> tuple[LinearHead, list[dict[str, float]]]:
    """A linear head (BCE, AdamW) on frozen features (records, D) of the train split, through the training
    loop; per epoch: train_loss, val_loss and val_macro_auroc. Features are standardised with training-split
    statistics folded into the head (``standardisation``)."""
    train_x = features["train"]
    mean, std = standardisation(train_x)
    head = LinearHead(train_x.shape[1], labels["train"].shape[1], mean=mean, std=std)
    val_x = torch.as_tensor(features["val"], dtype=torch.float32)

    @torch.no_grad()
    def val_auroc() -> dict[str, float]:
        head.eval()
        scores = head(val_x.to(next(head.parameters()).device)).float().cpu().numpy()
        head.train()
        return {"val_macro_auroc": scores_auroc(labels["val"], scores)}

    log = EpochLog(reporter, val_auroc)
    train(
        MultiLabelLoss(head),
        FeatureRecords(train_x, labels["train"]),
        cfg,
        device,
        checkpoint_path=checkpoint,
        val_set=FeatureRecords(features["val"], labels["val"]),
        on_progress=reporter.progress if reporter else None,
        on_epoch=log,
        should_cancel=reporter.should_cancel if reporter else None,
        on_resume=log.resumed,
    )
    return head.cpu().eval(), log.history


@torch.no_grad()
def head_scores(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Sigmoid probabilities (N, K) of a linear head on features (N, D)."""
    return torch.sigmoid(head(torch.as_tensor(features, dtype=torch.float32))).numpy()


# --------------------------------------------------------------------------------------------------
# results and pictures


def classification_plots(
    name: str,
    method: str,
    result: ClassificationResult,
    labels: np.ndarray,
    scores: np.ndarray,
    figures: Figures,
) -> list[str]:
    """ROC curves per class and confusion matrices at the result's (validation-tuned) thresholds, planned as
    ``roc_<name>.png`` and ``confusion_<name>.png``; ``method`` names the protocol in their titles."""
    thresholds = np.array([result.thresholds[c] for c in result.auroc_per_class])
    names = list(result.auroc_per_class)
    split = f"test split: {result.n_records} records"
    roc = figures.add(
        f"roc_{name}.png",
        "ROC per class",
        Caption(method, split, f"macro AUROC {result.macro_auroc:.3f}"),
        lambda path, title: plot_roc_curves(labels, scores, names, path, title=title),
    )
    confusion = figures.add(
        f"confusion_{name}.png",
        "Confusion at validation-tuned thresholds",
        Caption(method, split, f"macro F1 {result.macro_f1:.3f}"),
        lambda path, title: plot_confusion_matrices(
            labels, scores >= thresholds[None, :], names, path, title=title
        ),
    )
    return [roc, confusion]


def knn_protocol(
    embeddings: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    class_names: tuple[str, ...],
    k: int,
    metric: str,
    figures: Figures,
) -> tuple[dict, list[str]]:
    """kNN fitted on the train split, thresholds tuned on val, read on test (with val's macro AUROC, for
    choosing settings without the test split); its plots."""
    result = knn_evaluation(
        embeddings["train"], labels["train"], embeddings["val"], labels["val"],
        embeddings["test"], labels["test"], class_names, k=k, metric=metric,
    )  # fmt: skip
    val_scores = knn_scores(embeddings["train"], labels["train"], embeddings["val"], k, metric)
    scores = knn_scores(embeddings["train"], labels["train"], embeddings["test"], k, metric)
    out = {**result.to_dict(), "val_macro_auroc": scores_auroc(labels["val"], val_scores)}
    method = f"kNN (k={k}, {metric}, {len(labels['train'])} training records)"
    return out, classification_plots("knn", method, result, labels["test"], scores, figures)


def clustering_protocol(
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    figures: Figures,
    seed: int,
    map_method: str = "tsne",
    method: str = "embeddings",
) -> tuple[dict, list[str]]:
    """Cluster indices and k-means ARI/NMI of the (test) embeddings, and their 2-D map by superclass.

    On a split too small for them (e.g. a small ``record_limit``) the indices are None with
    ``undefined_reason``, and with a single record no map is drawn (``embedding_map_skipped`` says so)."""
    result = clustering_evaluation(embeddings, labels, class_names, seed=seed).to_dict()
    if len(embeddings) < 2:
        result["embedding_map_skipped"] = f"a 2-D map needs at least 2 records, not {len(embeddings)}"
        return result, []
    ari = result.get("kmeans_ari")
    headline = f"k-means ARI {ari:.3f}" if ari is not None else "clustering indices undefined"
    caption = Caption(method, f"test split: {len(embeddings)} records", headline)
    file = figures.add(
        "embedding_map.png",
        f"{map_method.upper()} of the test embeddings by superclass",
        caption,
        lambda path, title: plot_embedding_map(
            embeddings, labels, class_names, path, method=map_method, seed=seed, title=title
        ),
    )
    return result, [file]


def history_caption(method: str, history: list[dict[str, float]], records: dict[str, int]) -> Caption:
    """A training history's caption: its best validation AUROC (epoch), else its last losses."""
    split = f"train {records.get('train', 0)} / val {records.get('val', 0)} records"
    scored = [
        (row[k], row["epoch"], k) for row in history for k in row if k.startswith("val_") and "auroc" in k
    ]
    if scored:
        best, epoch, name = max(scored)
        headline = f"best {name.replace('_', ' ')} {best:.3f} (epoch {epoch})"
    else:
        last = history[-1]
        headline = f"last train loss {last.get('train_loss', float('nan')):.4f}"
        if "val_loss" in last:
            headline += f", val loss {last['val_loss']:.4f}"
    return Caption(method, split, headline)


def history_plot(
    history: list[dict[str, float]], figures: Figures, file: str, method: str, records: dict[str, int]
) -> list[str]:
    """The per-epoch curves of a training run, planned as ``file``."""
    if not history:
        return []
    caption = history_caption(method, history, records)
    return [
        figures.add(
            file,
            "Per-epoch metrics",
            caption,
            lambda path, title: plot_history(history, path, title=title),
        )
    ]


# --------------------------------------------------------------------------------------------------
# kNN reference sets (POST /predict?method=knn)


def save_reference(
    path: Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    record_ids: np.ndarray,
    class_names: tuple[str, ...],
    knn: dict,
    dataset: str,
    job_id: uuid.UUID,
) -> dict:
    """Write the labelled reference set (npz) and return the ``model_versions.knn_reference`` entry; the
    thresholds are those kNN's validation votes tuned (``knn``: a kNN ``ClassificationResult`` dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(
        tmp,
        embeddings=embeddings.astype(np.float32),
        labels=labels.astype(np.float32),
        record_ids=np.asarray(record_ids).astype(str),
        class_names=np.array(class_names),
    )
    tmp.replace(path)
    return {
        "file": str(path.resolve()),
        "class_names": list(class_names),
        "thresholds": [knn["thresholds"][c] for c in class_names],
        "k": knn["params"]["k"],
        "metric": knn["params"]["metric"],
        "records": int(len(embeddings)),
        "dimension": int(embeddings.shape[1]),
        "dataset": dataset,
        "split": "train",
        "source_job_id": str(job_id),
        "val_thresholds_from": "kNN votes of the validation split (max F1 per class)",
        "test_macro_auroc": knn["macro_auroc"],
        "test_macro_f1": knn["macro_f1"],
    }
