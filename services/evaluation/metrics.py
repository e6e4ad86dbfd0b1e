"""Downstream metrics on multi-label superclasses (scikit-learn throughout).

Three protocols, each returning a JSON-serialisable result (``to_dict``):
- ``classification_result``: scores of any classifier (linear probe, fine-tuned head, kNN) -> macro and
  per-class AUROC, and macro F1 at per-class thresholds tuned on the validation fold (max F1 per class);
- ``knn_evaluation``: k nearest neighbours (cosine by default) fitted on training embeddings; a record's
  score for a class is the fraction of its neighbours that carry the class;
- ``clustering_evaluation``: on L2-normalised embeddings, Davies-Bouldin, silhouette and Calinski-Harabasz
  with the (single-label) classes as clusters, and k-means (k = number of classes) scored against the
  classes with ARI and NMI. (The prototype reported NMI(labels, labels), always 1.)

Shapes: embeddings (N, D); labels (N, K) multi-hot (float or int); scores (N, K), higher = more likely.
"""

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import rankdata
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    f1_score,
    normalized_mutual_info_score,
    precision_recall_curve,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from services.evaluation.linear_probe import macro_auroc


def _jsonable(value):
    """NaN/inf -> None, numpy scalars -> Python numbers, recursively (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ClassificationResult:
    """One protocol's scores on the evaluated split (thresholds come from the validation split)."""

    protocol: str
    n_records: int
    macro_auroc: float
    auroc_per_class: dict[str, float]
    macro_f1: float
    f1_per_class: dict[str, float]
    thresholds: dict[str, float]
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class ClusteringResult:
    n_records: int
    n_classes: int
    davies_bouldin: float  # lower is better; classes as clusters
    silhouette: float  # -1..1, higher is better; classes as clusters
    calinski_harabasz: float  # higher is better; classes as clusters
    kmeans_ari: float  # k-means clusters vs classes: 0 = chance, 1 = identical partitions
    kmeans_nmi: float  # k-means clusters vs classes: 1 = identical partitions
    class_counts: dict[str, int]
    undefined_reason: str | None = None  # why the indices are NaN (None in JSON), e.g. one class present

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


# --------------------------------------------------------------------------------------------------
# Scores -> AUROC, thresholds, F1


def tune_thresholds(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K,) per-class thresholds maximising F1 on these (validation) labels and scores.

    Predict positive when ``score >= threshold``. A class without positives here gets +inf (never
    predicted), one without negatives the lowest score.
    """
    thresholds = np.full(labels.shape[1], np.inf)
    for k in range(labels.shape[1]):
        y, s = labels[:, k], scores[:, k]
        if y.sum() == 0:
            continue
        precision, recall, cuts = precision_recall_curve(y, s)  # cuts: (T,), precision/recall: (T+1,)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds[k] = cuts[int(np.argmax(f1))]
    return thresholds


def f1_at(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> tuple[float, np.ndarray]:
    """(macro F1, per-class F1 (K,)) of the predictions ``scores >= thresholds``."""
    predicted = (scores >= thresholds[None, :]).astype(int)
    per_class = f1_score(labels.astype(int), predicted, average=None, zero_division=0)
    return float(per_class.mean()), per_class


def classification_result(
    protocol: str,
    val_labels: np.ndarray,
    val_scores: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: tuple[str, ...],
    params: dict | None = None,
) -> ClassificationResult:
    """AUROC of ``scores`` against ``labels``; F1 there at the thresholds that maximise F1 on val."""
    thresholds = tune_thresholds(val_labels, val_scores)
    auroc, auroc_per_class = macro_auroc(labels, scores)
    f1, f1_per_class = f1_at(labels, scores, thresholds)
    return ClassificationResult(
        protocol=protocol,
        n_records=len(labels),
        macro_auroc=auroc,
        auroc_per_class=dict(zip(class_names, map(float, auroc_per_class), strict=True)),
        macro_f1=f1,
        f1_per_class=dict(zip(class_names, map(float, f1_per_class), strict=True)),
        thresholds=dict(zip(class_names, map(float, thresholds), strict=True)),
        params=params or {},
    )


def crossfit_selected_auroc(
    labels: np.ndarray, member_scores: list[np.ndarray], splits: int = 20, seed: int = 0
) -> float:
    """Validation macro AUROC of early stopping, judged on records that did not choose the epoch.

    The best-epoch validation figure is read on the records that chose the epoch, which flatters recipes
    with noisy curves. Here the validation records are halved at random ``splits`` times; each half picks
    each member's epoch of best macro AUROC, the members' scores at their picked epochs are averaged (one
    member: its scores), and the other half reads the macro AUROC; the mean over both directions of every
    split. The splits depend on ``seed`` and the record count only, so recipes scored on the same
    validation fold are compared on the same halves.

    labels (N, K) multi-hot; member_scores: per ensemble member, (E, N, K) scores at each of E epochs (the
    last epoch alone for a model that keeps its last epoch).
    """

    def best_epoch(scores: np.ndarray, rows: np.ndarray) -> int:  # the first best; the last if none scores
        by_epoch = macro_auroc_by_epoch(labels[rows], scores[:, rows])
        return int(np.nanargmax(by_epoch)) if np.isfinite(by_epoch).any() else len(scores) - 1

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(splits):
        order = rng.permutation(len(labels))
        halves = order[: len(labels) // 2], order[len(labels) // 2 :]
        for choose, read in (halves, halves[::-1]):
            picked = [scores[best_epoch(scores, choose)] for scores in member_scores]  # (N, K) per member
            values.append(macro_auroc_by_epoch(labels[read], np.mean(picked, axis=0)[None, read])[0])
    return float(np.nanmean(values))


def macro_auroc_by_epoch(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(E,) ``macro_auroc`` of each of E score sets at once: (E, N, K) scores, (N, K) labels.

    Per class, AUROC is the Mann-Whitney U of the positives' mid-ranks over P * (N - P), which is
    scikit-learn's ROC AUC with ties counted as half; classes without both outcomes are left out (NaN when
    none has them). ``crossfit_selected_auroc`` scores thousands of (epoch, half) pairs per job: one rank
    pass instead of a ``roc_auc_score`` call per class and epoch.
    """
    positives = labels.sum(axis=0)  # (K,)
    negatives = len(labels) - positives
    ranks = rankdata(scores, axis=1)  # (E, N, K), ties at their mid-rank
    u = (ranks * labels).sum(axis=1) - positives * (positives + 1) / 2  # (E, K)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)
    defined = np.isfinite(per_class).any(axis=1)
    out = np.full(len(scores), np.nan)
    out[defined] = np.nanmean(per_class[defined], axis=1)
    return out


# --------------------------------------------------------------------------------------------------
# kNN


def knn_scores(
    train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, k: int = 20, metric: str = "cosine"
) -> np.ndarray:
    """(N, K) neighbour votes: the fraction of the k nearest training records carrying each class."""
    neighbours = NearestNeighbors(n_neighbors=min(k, len(train_x)), metric=metric).fit(train_x)
    index = neighbours.kneighbors(x, return_distance=False)  # (N, k)
    return train_y[index].mean(axis=1)  # (N, k, K) -> (N, K)


def knn_evaluation(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    class_names: tuple[str, ...],
    k: int = 20,
    metric: str = "cosine",
) -> ClassificationResult:
    """kNN fitted on the training embeddings; thresholds on val's votes, AUROC and F1 on test's."""
    val_scores = knn_scores(train_x, train_y, val_x, k, metric)
    test_scores = knn_scores(train_x, train_y, test_x, k, metric)
    return classification_result(
        "knn", val_y, val_scores, test_y, test_scores, class_names, {"k": k, "metric": metric}
    )


# --------------------------------------------------------------------------------------------------
# Clustering


def single_label(labels: np.ndarray, priority: tuple[int, ...] | None = None) -> np.ndarray:
    """(N,) one class per record for multi-label (N, K) labels; -1 where a record has none.

    A record with several classes takes the first of them in ``priority`` (class indices). Default
    priority: the rarest class in ``labels`` first (the most specific diagnosis, e.g. MI before NORM),
    ties by column order. Pass an explicit priority to compare label sets of different prevalence.
    """
    labels = np.asarray(labels) > 0
    if priority is None:
        priority = tuple(np.argsort(labels.sum(axis=0), kind="stable"))
    out = np.full(len(labels), -1, dtype=np.int64)
    for k in reversed(priority):  # the highest priority is written last
        out[labels[:, k]] = k
    return out


def clustering_evaluation(
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    priority: tuple[int, ...] | None = None,
    seed: int = 0,
) -> ClusteringResult:
    """Cluster indices of L2-normalised embeddings against the classes (``single_label``), and k-means
    with k = number of classes present scored against them (ARI, NMI). Unlabelled records are left out.

    The indices are defined only for 2 to n - 1 classes among n records (scikit-learn raises otherwise, and
    k-means with one cluster per record or one cluster in all matches any partition trivially): outside
    that, e.g. a small test split whose records are all NORM, every index is NaN and ``undefined_reason``
    says why, so the job's other protocols still report."""
    y = single_label(labels, priority)
    keep = y >= 0
    y = y[keep]
    present = np.unique(y)
    counts = {class_names[k]: int((y == k).sum()) for k in present}
    if not 2 <= len(present) < len(y):
        reason = (
            f"cluster indices need at least 2 classes and more records than classes; the split has "
            f"{len(y)} labelled record(s) of {len(present)} class(es)"
        )
        nan = float("nan")
        return ClusteringResult(len(y), len(present), nan, nan, nan, nan, nan, counts, reason)
    x = normalize(np.asarray(embeddings, dtype=np.float64)[keep])  # unit rows: (n, D)
    clusters = KMeans(n_clusters=len(present), n_init=10, random_state=seed).fit_predict(x)
    return ClusteringResult(
        n_records=len(y),
        n_classes=len(present),
        davies_bouldin=float(davies_bouldin_score(x, y)),
        silhouette=float(silhouette_score(x, y)),
        calinski_harabasz=float(calinski_harabasz_score(x, y)),
        kmeans_ari=float(adjusted_rand_score(y, clusters)),
        kmeans_nmi=float(normalized_mutual_info_score(y, clusters)),
        class_counts=counts,
    )
