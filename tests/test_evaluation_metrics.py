"""The harness's AUROC, AUPR and FPR95 against scikit-learn's on the same scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bliss.errors import InvalidInputError
from bliss.evaluation.metrics import MetricSummary, detection_metrics


def sklearn_fpr95(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


@pytest.mark.parametrize("seed", range(12))
def test_metrics_equal_sklearn_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(5, 400))
    labels = rng.random(size) < rng.uniform(0.05, 0.95)
    labels[:2] = [True, False]  # both classes present
    scores = rng.normal(size=size) + labels * rng.uniform(0, 2)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    ours = detection_metrics(scores, labels)
    assert ours.auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ours.aupr == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert ours.fpr95 == pytest.approx(sklearn_fpr95(labels, scores), abs=1e-12)


def test_known_small_example():
    # scikit-learn's documented example: AUROC 0.75, AP 0.8333.
    metrics = detection_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert metrics.auroc == pytest.approx(0.75)
    assert metrics.aupr == pytest.approx(0.8333333333)
    assert metrics.fpr95 == pytest.approx(0.5)  # both anomalies caught only below 0.35


def test_constant_scores_are_chance():
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    metrics = detection_metrics(np.zeros(8), labels)
    assert metrics.auroc == 0.5
    assert metrics.aupr == pytest.approx(labels.mean())
    assert metrics.fpr95 == 1.0


def test_higher_score_means_anomalous():
    labels = np.array([0, 0, 1, 1])
    assert detection_metrics(np.array([0.0, 1.0, 2.0, 3.0]), labels).auroc == 1.0
    assert detection_metrics(np.array([3.0, 2.0, 1.0, 0.0]), labels).auroc == 0.0


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        (np.array([0.1, 0.2]), np.array([1, 1])),
        (np.array([0.1, 0.2]), np.array([0, 0])),
        (np.array([0.1, np.nan]), np.array([0, 1])),
        (np.array([0.1, 0.2, 0.3]), np.array([0, 1])),
    ],
)
def test_bad_inputs_are_rejected(scores, labels):
    with pytest.raises(InvalidInputError):
        detection_metrics(scores, labels)


def test_summary_is_mean_and_population_std():
    summary = MetricSummary.of([0.9, 0.8, 1.0])
    assert summary.mean == pytest.approx(0.9)
    assert summary.std == pytest.approx(np.sqrt(2 / 300))


def test_fpr95_counts_a_tpr_of_exactly_95_percent():
    # 19 of 20 anomalies above every normal image, the 20th below them all.
    scores = np.r_[np.arange(10.0, 29.0), -1.0, np.arange(5.0)]
    labels = np.r_[np.ones(20, dtype=bool), np.zeros(5, dtype=bool)]
    assert detection_metrics(scores, labels).fpr95 == 0.0
    assert sklearn_fpr95(labels, scores) == 0.0
