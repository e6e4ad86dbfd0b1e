"""Evaluation figures as PNG files (matplotlib, Agg canvas; no pyplot, so no global state and no display).

Every function draws one figure, writes it to ``path`` (folders created) and returns that path. A figure's
``title`` is drawn above it and stored in the PNG file itself (its ``Title`` text chunk, read back by
``png_title``). A job's figures are planned on a ``Figures`` book and drawn together once the model version
they describe is known, each titled by its ``Caption``: what it shows, the method, the model version, the
split and its size, and its headline figure.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import multilabel_confusion_matrix, roc_auc_score, roc_curve
from sklearn.preprocessing import normalize

from services.evaluation.metrics import single_label

DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path, title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        figure.suptitle(title, fontsize="medium")
    figure.savefig(path, format="png", metadata={"Title": title} if title else None)
    return path


def png_title(path: Path) -> str | None:
    """The title a figure was saved with (its PNG ``Title`` text chunk), None when it has none."""
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Title")


@dataclass(frozen=True)
class Caption:
    """What a figure names: the method that made it, the split and its size, and its headline figure."""

    method: str  # e.g. "kNN (k=10, cosine)", "linear probe", "ST-MEM pretraining"
    split: str  # e.g. "test split: 66 records", "train 26 / val 6 records"
    headline: str  # e.g. "macro AUROC 0.812"

    def title(self, what: str, model: str) -> str:
        return f"{what}: {self.method} on {model}\n{self.split} | {self.headline}"


class Figures:
    """A job's figures, planned as its protocols run and drawn by ``draw(model)`` once the model version they
    describe is known (a fine-tuning job registers its version after evaluating it)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._planned: list[tuple[str, str, Caption, Callable[[Path, str], Path]]] = []

    def add(self, file: str, what: str, caption: Caption, draw: Callable[[Path, str], Path]) -> str:
        """Plan ``draw(path, title)`` as ``file``; returns the file name."""
        self._planned.append((file, what, caption, draw))
        return file

    def draw(self, model: str) -> dict[str, str]:
        """Draw every planned figure titled for ``model``; returns {file name: title}."""
        titles = {}
        for file, what, caption, draw in self._planned:
            titles[file] = caption.title(what, model)
            draw(self.folder / file, titles[file])
        self._planned.clear()
        return titles


def plot_history(history: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Per-epoch curves from the training loop's history (list of {"epoch": e, name: value, ...}).

    Left: every key containing "loss"; right: every other numeric key (metrics), except lr, throughput
    and the epoch.
    """
    epochs = [row["epoch"] for row in history]
    keys = sorted({k for row in history for k in row if k != "epoch"})
    losses = [k for k in keys if "loss" in k]
    skip = {"lr", "samples_per_s", "epoch_s"}
    metrics = [k for k in keys if k not in losses and k not in skip]
    figure = _new_figure(10, 4)
    left, right = figure.subplots(1, 2)
    for axis, names, label in ((left, losses, "loss"), (right, metrics, "metric")):
        for name in names:
            values = [row.get(name, np.nan) for row in history]
            axis.plot(epochs, values, marker="o", label=name)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if names:
            axis.legend()
    return _save(figure, path, title or "training history")


def plot_roc_curves(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """One ROC curve per class (labels (N, K) multi-hot, scores (N, K)); classes lacking positives or
    negatives are listed but not drawn."""
    figure = _new_figure(5.5, 5)
    axis = figure.subplots()
    for k, name in enumerate(class_names):
        y = labels[:, k]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores[:, k])
            axis.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, scores[:, k]):.3f})")
        else:
            axis.plot([], [], label=f"{name} (undefined: one outcome only)")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path, title or "ROC per class")


def plot_confusion_matrices(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Multi-label confusion: one 2x2 matrix (rows true 0/1, columns predicted 0/1) per class in a grid.

    labels, predicted: (N, K) binary (e.g. ``scores >= thresholds``).
    """
    matrices = multilabel_confusion_matrix(labels.astype(int), predicted.astype(int))  # (K, 2, 2)
    cols = min(len(class_names), 3)
    rows = int(np.ceil(len(class_names) / cols))
    figure = _new_figure(3.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(figure.subplots(rows, cols)).ravel()
    for axis, name, matrix in zip(axes, class_names, matrices, strict=False):
        axis.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), count in np.ndenumerate(matrix):
            colour = "white" if count > matrix.max() / 2 else "black"
            axis.text(j, i, str(count), ha="center", va="center", color=colour)
        axis.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["no", "yes"], yticklabels=["no", "yes"])
        axis.set(xlabel="predicted", ylabel="true", title=name)
    for axis in axes[len(class_names) :]:
        axis.set_visible(False)
    return _save(figure, path, title)


def embedding_map(embeddings: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) of the L2-normalised embeddings: t-SNE (cosine-like) or PCA."""
    x = normalize(np.asarray(embeddings, dtype=np.float64))
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        perplexity = min(30.0, (len(x) - 1) / 3)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"unknown method {method!r}: 'tsne' or 'pca'")


def plot_embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    method: str = "tsne",
    seed: int = 0,
    title: str = "",
) -> Path:
    """2-D map (t-SNE or PCA) of embeddings (N, D) coloured by class.

    labels: (N, K) multi-hot (reduced to one class per record by ``metrics.single_label``: rarest class
    first) or (N,) class indices; -1 = unlabelled (grey).
    """
    y = single_label(labels) if np.ndim(labels) == 2 else np.asarray(labels)
    points = embedding_map(embeddings, method, seed)  # (N, 2)
    figure = _new_figure(6, 5.5)
    axis = figure.subplots()
    if (y < 0).any():
        axis.scatter(*points[y < 0].T, s=8, c="lightgrey", label="no class")
    colours = [f"C{i}" for i in range(10)]
    for k, name in enumerate(class_names):
        if (y == k).any():
            axis.scatter(*points[y == k].T, s=10, c=colours[k % 10], label=f"{name} ({(y == k).sum()})")
    axis.set(xticks=[], yticks=[])
    axis.legend(fontsize="small", markerscale=2)
    return _save(figure, path, title or f"{method.upper()} of the embeddings")
