"""Detection metrics with anomalies as the positive class (higher score = more anomalous).

AUROC, average precision (AUPR) and the false-positive rate at 95% true-positive rate
(FPR95), computed from one sort of the scores. Ties are handled as scikit-learn handles
them (one ROC point per distinct score), so the numbers equal ``roc_auc_score``,
``average_precision_score`` and the first ``roc_curve`` point with TPR >= 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bliss.errors import InvalidInputError

FPR_AT_TPR = 0.95
METRIC_NAMES = ("auroc", "aupr", "fpr95")


@dataclass(frozen=True)
class RocCurve:
    """One point per distinct score, from the highest threshold down, starting at (0, 0)."""

    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray  # at each threshold (no value for the (0, 0) start)
    thresholds: np.ndarray  # the score of each point; +inf for the start


@dataclass(frozen=True)
class DetectionMetrics:
    auroc: float
    aupr: float
    fpr95: float

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in METRIC_NAMES}


def roc_curve(scores: np.ndarray, is_anomaly: np.ndarray) -> RocCurve:
    """The ROC curve of ``scores`` [m] against the boolean labels ``is_anomaly`` [m]."""
    scores, labels = _checked(scores, is_anomaly)
    order = np.argsort(-scores, kind="mergesort")
    ranked_scores = scores[order]
    ranked_labels = labels[order]
    # The last position of every run of equal scores is one threshold.
    ends = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]
    true_positives = np.cumsum(ranked_labels)[ends]
    false_positives = ends + 1 - true_positives
    positives = true_positives[-1]
    negatives = false_positives[-1]
    return RocCurve(
        fpr=np.r_[0.0, false_positives / negatives],
        tpr=np.r_[0.0, true_positives / positives],
        precision=true_positives / (ends + 1),
        thresholds=np.r_[np.inf, ranked_scores[ends]],
    )


def detection_metrics(scores: np.ndarray, is_anomaly: np.ndarray) -> DetectionMetrics:
    curve = roc_curve(scores, is_anomaly)
    return DetectionMetrics(
        auroc=float(np.sum(np.diff(curve.fpr) * (curve.tpr[1:] + curve.tpr[:-1]) / 2)),
        aupr=float(np.sum(np.diff(curve.tpr) * curve.precision)),
        fpr95=fpr_at_tpr(curve, FPR_AT_TPR),
    )


def fpr_at_tpr(curve: RocCurve, tpr: float) -> float:
    """The lowest false-positive rate at which at least ``tpr`` of the anomalies are caught."""
    return float(curve.fpr[np.argmax(curve.tpr >= tpr)])


@dataclass(frozen=True)
class MetricSummary:
    """Mean and population std (ddof = 0) of one metric over trials."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: list[float]) -> MetricSummary:
        array = np.asarray(values, dtype=np.float64)
        return cls(float(array.mean()), float(array.std()))


def summarise(per_trial: list[DetectionMetrics]) -> dict[str, MetricSummary]:
    return {name: MetricSummary.of([getattr(m, name) for m in per_trial]) for name in METRIC_NAMES}


def _checked(scores: np.ndarray, is_anomaly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_anomaly, dtype=bool)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise InvalidInputError(
            f"scores {scores.shape} and labels {labels.shape} must be two 1-D arrays of one length"
        )
    if not np.isfinite(scores).all():
        raise InvalidInputError("scores contain NaN or infinite values")
    if labels.all() or not labels.any():
        raise InvalidInputError(
            "the test set needs both normal and anomalous images to compute detection metrics"
        )
    return scores, labels
