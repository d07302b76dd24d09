"""The BLISS anomaly score: eqs. 5, 7, 9, 10 and 11 of the paper, over a batch of images.

Every equation of the score lives here and nowhere else; the server, local scoring and
the evaluation harness all call :func:`score_batch`. The top-K search of eq. 7 itself is
done by the caller (a FAISS index over the whole dictionary, see ``dictionary_index``),
which hands in the K similarities and the per-class statistics gathered at those entries.

Shapes: B test images, N normal classes, K dictionary entries per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from bliss.errors import InvalidInputError

DEFAULT_K = 10
DEFAULT_LAMBDA = 0.5
# Lambda weighs ET against IC (the paper sweeps 0.1 to 2); at 10^6 the score is ET alone
# for any practical purpose, so anything larger is a typo or a probe, refused before it
# can push scores towards overflow (by the server per request, by the indexer as a default).
MAX_LAMBDA = 1e6
DEFAULT_EPS = 1e-8


class ScoringMode(str, Enum):
    """What the per-class score s(x, i) is made of (the paper's Table 3 ablation)."""

    IC_RAW = "ic_raw"  # -sim(z, C_i): Biased-CLIP, no normalisation ("w/o (5)")
    IC = "ic"  # IC(x, i) of eq. 5 alone ("w (5)")
    BLISS = "bliss"  # IC(x, i) + lambda * ET(x, i): the full score (eq. 10)

    @classmethod
    def parse(cls, value: str | ScoringMode) -> ScoringMode:
        """The mode named ``value``, or an InvalidInputError listing the valid names."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(mode.value for mode in cls)
            raise InvalidInputError(f"unknown scoring mode {value!r}: use one of {names}") from None


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of B images, with everything needed to explain them.

    ``internal_class_score`` and ``external_text_score`` are the two terms of the class
    that attains the minimum (``nearest_class``). In ``ic_raw`` mode the internal term is
    the raw ``-sim(z, C_i)``. The external term is reported in every mode (it explains
    the top-K entries) but only ``bliss`` adds it to the score.
    """

    score: np.ndarray  # [B] s(x), eq. 11
    internal_class_score: np.ndarray  # [B]
    external_text_score: np.ndarray  # [B]
    nearest_class: np.ndarray  # [B] int64, argmin over classes
    class_scores: np.ndarray  # [B, N] s(x, i), eq. 10
    top_entry_ids: np.ndarray  # [B, K] int64, dictionary positions, most similar first
    top_entry_similarities: np.ndarray  # [B, K] sim(z, d) for d in D*
    normal_quantile: np.ndarray | None = None  # [B] when the version is calibrated

    def __len__(self) -> int:
        return int(self.score.shape[0])


def internal_class_scores(
    label_similarities: np.ndarray, label_mean: np.ndarray, label_std: np.ndarray, eps: float
) -> np.ndarray:
    """Eq. 5: IC(x, i) = -(sim(z, C_i) - mu_i) / (sigma_i + eps), shape [B, N]."""
    return -(label_similarities - label_mean[None, :]) / (label_std[None, :] + eps)


def external_text_scores(
    top_similarities: np.ndarray,
    top_entry_mean: np.ndarray,
    top_entry_std: np.ndarray,
    eps: float,
) -> np.ndarray:
    """Eq. 9: ET(x, i) = mean over d in D* of (sim(z, d) - mu_i(d)) / (sigma_i(d) + eps).

    ``top_similarities`` is [B, K]; the statistics are [B, N, K] (class i's mean and std
    at each image's K entries). Returns [B, N].
    """
    standardised = (top_similarities[:, None, :] - top_entry_mean) / (top_entry_std + eps)
    return standardised.mean(axis=2)


def score_batch(
    *,
    label_similarities: np.ndarray,
    label_mean: np.ndarray,
    label_std: np.ndarray,
    top_entry_ids: np.ndarray,
    top_similarities: np.ndarray,
    top_entry_mean: np.ndarray,
    top_entry_std: np.ndarray,
    mode: ScoringMode = ScoringMode.BLISS,
    lam: float = DEFAULT_LAMBDA,
    eps: float = DEFAULT_EPS,
) -> ScoreBatch:
    """Eqs. 5, 9, 10 and 11 for a batch, computed in float64.

    Args:
        label_similarities: [B, N] sim(z, C_i) for every image and class label.
        label_mean, label_std: [N] eq. 4 statistics of each class.
        top_entry_ids: [B, K] the eq. 7 top-K dictionary positions of each image.
        top_similarities: [B, K] sim(z, d) at those entries.
        top_entry_mean, top_entry_std: [B, N, K] eq. 8 statistics of each class at them.
        mode: which per-class score to minimise (see :class:`ScoringMode`).
        lam: weight of the external text score (eq. 10).
        eps: added to every sigma (not to the variance).
    """
    _check_shapes(label_similarities, label_mean, top_similarities, top_entry_mean, top_entry_std)
    if not np.isfinite(lam):
        raise InvalidInputError(f"lambda must be a finite number, got {lam}")
    label_similarities = np.asarray(label_similarities, dtype=np.float64)
    top_similarities = np.asarray(top_similarities, dtype=np.float64)

    internal = internal_class_scores(
        label_similarities,
        np.asarray(label_mean, dtype=np.float64),
        np.asarray(label_std, dtype=np.float64),
        eps,
    )
    external = external_text_scores(
        top_similarities,
        np.asarray(top_entry_mean, dtype=np.float64),
        np.asarray(top_entry_std, dtype=np.float64),
        eps,
    )
    if mode is ScoringMode.IC_RAW:
        internal = -label_similarities
        class_scores = internal
    elif mode is ScoringMode.IC:
        class_scores = internal
    else:
        class_scores = internal + lam * external  # eq. 10

    nearest = np.argmin(class_scores, axis=1)  # eq. 11
    rows = np.arange(class_scores.shape[0])
    return ScoreBatch(
        score=class_scores[rows, nearest],
        internal_class_score=internal[rows, nearest],
        external_text_score=external[rows, nearest],
        nearest_class=nearest.astype(np.int64),
        class_scores=class_scores,
        top_entry_ids=np.asarray(top_entry_ids, dtype=np.int64),
        top_entry_similarities=top_similarities,
    )


def _check_shapes(
    label_similarities: np.ndarray,
    label_mean: np.ndarray,
    top_similarities: np.ndarray,
    top_entry_mean: np.ndarray,
    top_entry_std: np.ndarray,
) -> None:
    batch, classes = label_similarities.shape
    k = top_similarities.shape[1]
    expected = {
        "label_mean": (label_mean.shape, (classes,)),
        "top_similarities": (top_similarities.shape, (batch, k)),
        "top_entry_mean": (top_entry_mean.shape, (batch, classes, k)),
        "top_entry_std": (top_entry_std.shape, (batch, classes, k)),
    }
    for name, (shape, want) in expected.items():
        if tuple(shape) != want:
            raise InvalidInputError(f"{name} has shape {tuple(shape)}, expected {want}")
    if k < 1:
        raise InvalidInputError("K must be at least 1")
