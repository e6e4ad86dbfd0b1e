"""Downstream metrics and plots, on hand-made cases and on embeddings of the real PTB-XL records."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from services.datasets.cache import preprocessed
from services.datasets.ptbxl import SUPERCLASSES, PtbxlDataset
from services.ecg.preprocess import InputSpec
from services.evaluation.linear_probe import macro_auroc
from services.evaluation.metrics import (
    classification_result,
    clustering_evaluation,
    crossfit_selected_auroc,
    f1_at,
    knn_evaluation,
    knn_scores,
    macro_auroc_by_epoch,
    single_label,
    tune_thresholds,
)
from services.evaluation.plots import (
    plot_confusion_matrices,
    plot_embedding_map,
    plot_history,
    plot_roc_curves,
)
from services.models.st_mem import StMemConfig, StMemEncoder
from services.models.triplet import embed_all
from services.training.loop import CropDataset

ENCODER = StMemConfig(width=32, depth=1, heads=2, dim_head=16, mlp_dim=64)  # random, frozen: fast


@dataclass
class Embedded:
    embeddings: np.ndarray  # (500, 32)
    labels: np.ndarray  # (500, 5)
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@pytest.fixture(scope="module")
def real(ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    """The 500 real PTB-XL records (centre crops) through a frozen random ST-MEM encoder."""
    dataset = PtbxlDataset(ptbxl_dir)
    cache = preprocessed(
        dataset, {"path": str(ptbxl_dir)}, InputSpec(), tmp_path_factory.getbasetemp() / "ptbxl-cache"
    )
    torch.manual_seed(0)
    encoder = StMemEncoder(ENCODER).eval()
    embeddings = embed_all(encoder, CropDataset(np.asarray(cache.signals), 2250, random_crop=False))
    labels, folds = cache.labels[cache.record_index], cache.folds[cache.record_index]
    train = np.flatnonzero((folds <= 8) & (labels.sum(1) > 0))
    return Embedded(embeddings, labels, train, np.flatnonzero(folds == 9), np.flatnonzero(folds == 10))


# --------------------------------------------------------------------------------------------------
# thresholds, F1, AUROC


def test_tuned_thresholds_maximise_f1_per_class() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < [0.1, 0.4, 0.7]).astype(float)
    scores = labels * rng.normal(1.0, 1.0, labels.shape) + rng.normal(0, 1.0, labels.shape)
    thresholds = tune_thresholds(labels, scores)
    macro, per_class = f1_at(labels, scores, thresholds)
    for k in range(3):
        best = max(f1_score(labels[:, k], scores[:, k] >= t) for t in np.unique(scores[:, k]))
        assert per_class[k] == pytest.approx(best)
        assert per_class[k] > f1_score(labels[:, k], scores[:, k] >= 0.5)  # tuned beats a fixed cut here
    assert macro == pytest.approx(per_class.mean())


def test_class_without_positives_is_never_predicted_and_json_has_no_nan() -> None:
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.2, 0.4]])
    result = classification_result("probe", labels, scores, labels, scores, ("A", "B"))
    assert result.thresholds["B"] == np.inf and result.f1_per_class["B"] == 0.0
    assert result.macro_auroc == 1.0 and result.f1_per_class["A"] == 1.0
    encoded = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert encoded["auroc_per_class"]["B"] is None and encoded["thresholds"]["B"] is None


def test_macro_auroc_by_epoch_is_scikit_learns_macro_auroc_of_each_epoch(real: Embedded) -> None:
    labels = real.labels[real.val].copy()
    labels[:, 4] = 0  # a class without positives is left out, as macro_auroc leaves it out
    rng = np.random.default_rng(2)
    scores = np.round(rng.random((6, *labels.shape)), 1)  # ties, counted as half
    scores[3] = labels + rng.normal(0, 0.5, labels.shape)
    expected = [macro_auroc(labels, epoch)[0] for epoch in scores]
    np.testing.assert_allclose(macro_auroc_by_epoch(labels, scores), expected, rtol=0, atol=1e-12)
    assert np.isnan(macro_auroc_by_epoch(np.zeros_like(labels), scores)).all()  # no class scores at all


def test_crossfit_validation_does_not_reward_the_luckiest_of_many_noisy_epochs(real: Embedded) -> None:
    labels = real.labels[real.val]  # a real validation fold (fold 9)
    rng = np.random.default_rng(0)
    noise = rng.random((30, len(labels), labels.shape[1]))  # 30 epochs that know nothing
    best_epoch_figure = max(macro_auroc(labels, epoch)[0] for epoch in noise)
    crossfit = crossfit_selected_auroc(labels, [noise])
    assert best_epoch_figure > 0.56  # read on the records that chose it: flattered
    assert abs(crossfit - 0.5) < 0.04 and crossfit < best_epoch_figure - 0.05


def test_crossfit_validation_finds_the_epoch_that_learned_and_credits_the_ensemble(real: Embedded) -> None:
    labels = real.labels[real.val]
    rng = np.random.default_rng(1)
    learned = labels + rng.normal(0, 0.8, labels.shape)  # (N, K): informative scores
    epochs = rng.random((12, *labels.shape))
    epochs[7] = learned  # one good epoch among noise
    full = macro_auroc(labels, learned)[0]
    assert full > 0.75
    assert abs(crossfit_selected_auroc(labels, [epochs]) - full) < 0.03
    # one epoch, no choice: the halves read the same scores
    assert abs(crossfit_selected_auroc(labels, [learned[None]]) - full) < 0.03
    # two members with independent errors: their average beats each
    other = labels + rng.normal(0, 0.8, labels.shape)
    single = max(crossfit_selected_auroc(labels, [m[None]]) for m in (learned, other))
    assert crossfit_selected_auroc(labels, [learned[None], other[None]]) > single + 0.01


# --------------------------------------------------------------------------------------------------
# kNN


def test_knn_scores_are_neighbour_votes() -> None:
    rng = np.random.default_rng(1)
    train_x, x = rng.normal(size=(60, 4)), rng.normal(size=(15, 4))
    train_y = (rng.random((60, 2)) < 0.4).astype(float)
    scores = knn_scores(train_x, train_y, x, k=7, metric="euclidean")
    for c in range(2):
        reference = KNeighborsClassifier(n_neighbors=7).fit(train_x, train_y[:, c]).predict_proba(x)[:, 1]
        np.testing.assert_allclose(scores[:, c], reference)


def test_knn_on_real_labels(real: Embedded) -> None:
    rng = np.random.default_rng(0)
    informative = real.labels + rng.normal(scale=0.5, size=real.labels.shape)
    noise = rng.normal(size=real.embeddings.shape)
    results = {}
    for name, x in (("informative", informative), ("noise", noise), ("encoder", real.embeddings)):
        split = [(x[s], real.labels[s]) for s in (real.train, real.val, real.test)]
        results[name] = knn_evaluation(*split[0], *split[1], *split[2], SUPERCLASSES, k=20)
    assert results["informative"].macro_auroc > 0.9 and results["informative"].macro_f1 > 0.6
    assert 0.35 < results["noise"].macro_auroc < 0.65
    # random-encoder features carry some label information (measured: macro AUROC 0.67 on fold 10)
    assert 0.55 < results["encoder"].macro_auroc < 0.9
    assert results["encoder"].params == {"k": 20, "metric": "cosine"}
    json.dumps(results["encoder"].to_dict(), allow_nan=False)


# --------------------------------------------------------------------------------------------------
# clustering


def test_single_label_prefers_the_rarest_class() -> None:
    labels = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0]])
    # prevalence: class 0 (5) > class 1 (2) = class 2 (2): priority 1, 2, 0
    np.testing.assert_array_equal(single_label(labels), [0, 1, 2, -1, 1, 0])
    np.testing.assert_array_equal(single_label(labels, priority=(0, 1, 2)), [0, 0, 0, -1, 0, 0])


def test_clustering_nmi_is_below_one_on_real_embeddings_and_one_only_when_perfect(real: Embedded) -> None:
    found = clustering_evaluation(real.embeddings, real.labels, SUPERCLASSES)
    assert found.n_records == int((real.labels.sum(1) > 0).sum()) == 488
    assert found.n_classes == 5 and sum(found.class_counts.values()) == 488
    assert 0.0 <= found.kmeans_nmi < 0.5 and found.kmeans_ari < 0.5  # measured: NMI 0.07, ARI 0.04

    # embeddings that ARE the classes: k-means recovers them exactly
    y = single_label(real.labels)
    rng = np.random.default_rng(0)
    perfect = np.eye(5)[np.maximum(y, 0)] + rng.normal(scale=0.01, size=(len(y), 5))
    ideal = clustering_evaluation(perfect, real.labels, SUPERCLASSES)
    assert ideal.kmeans_nmi == pytest.approx(1.0) and ideal.kmeans_ari == pytest.approx(1.0)
    assert ideal.silhouette > 0.9 > found.silhouette
    assert ideal.davies_bouldin < found.davies_bouldin
    assert ideal.calinski_harabasz > found.calinski_harabasz
    assert json.loads(json.dumps(found.to_dict()))["kmeans_nmi"] == found.kmeans_nmi


def test_clustering_indices_are_undefined_with_a_reason_below_two_classes() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8))
    one_class = np.tile([1, 0, 0, 0, 0], (6, 1))
    one_record_each = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]] + [[0] * 5] * 4)  # n == classes
    for labels in (one_class, one_record_each, np.zeros((6, 5))):
        result = clustering_evaluation(x, labels, SUPERCLASSES)
        as_json = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        for index in ("davies_bouldin", "silhouette", "calinski_harabasz", "kmeans_ari", "kmeans_nmi"):
            assert as_json[index] is None, (labels, index)
        assert "at least 2 classes and more records than classes" in as_json["undefined_reason"]
        assert (
            f"{result.n_records} labelled record(s) of {result.n_classes} class(es)"
            in result.undefined_reason
        )
    assert clustering_evaluation(x, one_class, SUPERCLASSES).class_counts == {"NORM": 6}
    # two classes among three records: defined, no reason
    defined = clustering_evaluation(x[:3], np.array([[1, 0, 0, 0, 0]] * 2 + [[0, 1, 0, 0, 0]]), SUPERCLASSES)
    assert defined.undefined_reason is None and -1 <= defined.silhouette <= 1


# --------------------------------------------------------------------------------------------------
# plots


def _check_png(path: Path, min_bytes: int) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes, len(data)
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plots_write_png_files(real: Embedded, tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "knn_auroc": 0.6 + 0.02 * e, "lr": 1e-3}
        for e in range(1, 9)
    ]
    train_x, train_y = real.embeddings[real.train], real.labels[real.train]
    val_scores = knn_scores(train_x, train_y, real.embeddings[real.val])
    test_scores = knn_scores(train_x, train_y, real.embeddings[real.test])
    predicted = test_scores >= tune_thresholds(real.labels[real.val], val_scores)
    test_labels = real.labels[real.test]
    paths = [
        plot_history(history, tmp_path / "history.png"),
        plot_roc_curves(test_labels, test_scores, SUPERCLASSES, tmp_path / "roc.png"),
        plot_confusion_matrices(test_labels, predicted, SUPERCLASSES, tmp_path / "sub" / "confusion.png"),
        plot_embedding_map(real.embeddings, real.labels, SUPERCLASSES, tmp_path / "tsne.png"),
        plot_embedding_map(real.embeddings, real.labels, SUPERCLASSES, tmp_path / "pca.png", method="pca"),
    ]
    assert [p.name for p in paths] == ["history.png", "roc.png", "confusion.png", "tsne.png", "pca.png"]
    for path in paths:
        _check_png(path, min_bytes=15_000)
    with pytest.raises(ValueError, match="unknown method"):
        plot_embedding_map(real.embeddings, real.labels, SUPERCLASSES, tmp_path / "x.png", method="umap")
