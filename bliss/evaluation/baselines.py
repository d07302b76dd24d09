"""The reference baselines printed beside BLISS; higher score = more anomalous.

- MCM (Ming et al., 2022): zero-shot maximum concept matching, the maximum softmax
  probability over the normal class prompts of the cosine similarities divided by a
  temperature (T = 1, the MCM paper's choice). Undefined for one normal class, where the
  softmax is always 1 (the BLISS paper leaves that cell empty too).
- DN2 (Bergman et al., 2020): mean Euclidean distance to the k = 5 nearest normal
  training embeddings.
"""

from __future__ import annotations

import numpy as np

from bliss.errors import InvalidInputError


def mcm_scores(test: np.ndarray, label_embeddings: np.ndarray, temperature: float) -> np.ndarray:
    """-max_i softmax_i(sim(z, C_i) / T) for unit ``test`` [m, D] and labels [N, D]."""
    if label_embeddings.shape[0] < 2:
        raise InvalidInputError("MCM needs at least two normal classes")
    if not temperature > 0:
        raise InvalidInputError(f"the MCM temperature must be positive, got {temperature}")
    logits = (test.astype(np.float64) @ label_embeddings.T.astype(np.float64)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return -1.0 / weights.sum(axis=1)  # the top class's probability is exp(0) / sum


def nearest_similarities(test: np.ndarray, normal: np.ndarray, k: int) -> np.ndarray:
    """Similarities [m, min(k, n)] of each unit ``test`` row to its nearest ``normal`` rows.

    Exact (a flat inner-product search). The k nearest of a union of banks are among the
    k nearest of each bank, so banks can be searched once and merged per trial.
    """
    from bliss.dictionary_index import build_index

    if k < 1:
        raise InvalidInputError(f"the DN2 k must be at least 1, got {k}")
    similarities, _ = build_index(normal).search(test, min(k, normal.shape[0]))
    return similarities


def knn_distance_scores(candidates: np.ndarray, k: int) -> np.ndarray:
    """DN2: mean distance to the ``k`` most similar of the candidate similarities [m, c].

    ``k`` is capped at the number of candidates (one-shot runs of one class).
    """
    k = min(k, candidates.shape[1])
    top = -np.partition(-candidates.astype(np.float64), k - 1, axis=1)[:, :k]
    # |a - b|^2 = 2 - 2 a.b for unit vectors; rounding can push it a hair below zero.
    return np.sqrt(np.maximum(2.0 - 2.0 * top, 0.0)).mean(axis=1)
