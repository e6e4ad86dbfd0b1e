"""The linear probe separates informative from uninformative features on the real PTB-XL labels."""

from pathlib import Path

import numpy as np

from services.datasets.ptbxl import SUPERCLASSES, PtbxlDataset
from services.evaluation.linear_probe import linear_probe, macro_auroc


def test_linear_probe_on_real_labels(ptbxl_dir: Path) -> None:
    dataset = PtbxlDataset(ptbxl_dir)
    labels = dataset.labels
    rng = np.random.default_rng(0)
    split = [dataset.split(s) for s in ("train", "val", "test")]
    noise = rng.normal(size=(len(labels), 16))
    informative = np.hstack([labels + rng.normal(scale=0.5, size=labels.shape), noise])
    good = linear_probe(informative, labels, *split, SUPERCLASSES)
    bad = linear_probe(noise, labels, *split, SUPERCLASSES)
    assert good.test_macro_auroc > 0.8, good
    assert 0.3 < bad.test_macro_auroc < 0.7, bad
    assert set(good.test_auroc_per_class) == set(SUPERCLASSES)


def test_macro_auroc_skips_classes_without_both_outcomes() -> None:
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.2, 0.4]])
    macro, per_class = macro_auroc(labels, scores)
    assert macro == 1.0 and np.isnan(per_class[1])
