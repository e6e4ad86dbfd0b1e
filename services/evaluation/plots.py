"""Evaluation figures as PNG files (matplotlib, Agg canvas; no pyplot, so no global state and no display).

Every function draws one figure, writes it to ``path`` (folders created) and returns that path.
"""

from collections.abc import Sequence
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


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_history(history: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Per-epoch curves from the training loop's history (list of {"epoch": e, name: value, ...}).

    Left: every key containing "loss"; right: every other numeric key (metrics), except lr, throughput
    and the epoch.
    """
    epochs = [row["epoch"] for row in history]
    keys = sorted({k for row in history for k in row if k != "epoch"})
    losses = [k for k in keys if "loss" in k]
    skip = {"lr", "samples_per_s"}
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
    figure.suptitle(title or "training history")
    return _save(figure, path)


def plot_roc_curves(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
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
    axis.set_title("ROC per class")
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_confusion_matrices(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], path: Path
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
    return _save(figure, path)


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
    axis.set(xticks=[], yticks=[], title=title or f"{method.upper()} of the embeddings")
    axis.legend(fontsize="small", markerscale=2)
    return _save(figure, path)
