"""Linear probe on frozen embeddings: one logistic regression per class, C chosen on the validation fold."""

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class ProbeResult:
    c: float
    val_macro_auroc: float
    test_macro_auroc: float
    test_auroc_per_class: dict[str, float]


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """Mean ROC-AUC over the classes that have both positives and negatives."""
    per_class = [
        roc_auc_score(labels[:, k], scores[:, k]) if 0 < labels[:, k].sum() < len(labels) else float("nan")
        for k in range(labels.shape[1])
    ]
    return float(np.nanmean(per_class)), per_class


def _fit_scores(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, c: float) -> np.ndarray:
    scores = np.zeros((len(x), train_y.shape[1]))
    for k in range(train_y.shape[1]):
        model = LogisticRegression(C=c, max_iter=2000)
        model.fit(train_x, train_y[:, k])
        scores[:, k] = model.decision_function(x)
    return scores


def linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    class_names: tuple[str, ...],
) -> ProbeResult:
    """Fit on ``train``, choose C by macro AUROC on ``val``, report ``test`` once with that C."""
    scaler = StandardScaler().fit(features[train])
    x = scaler.transform(features)
    val_aurocs = {
        c: macro_auroc(labels[val], _fit_scores(x[train], labels[train], x[val], c))[0] for c in C_GRID
    }
    best = max(val_aurocs, key=val_aurocs.get)
    test_macro, per_class = macro_auroc(labels[test], _fit_scores(x[train], labels[train], x[test], best))
    return ProbeResult(best, val_aurocs[best], test_macro, dict(zip(class_names, per_class, strict=True)))
