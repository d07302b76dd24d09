"""Random CLIP-like embeddings with a modality gap, shared by several test modules.

Text vectors (class labels and dictionary entries) cluster tightly around one shared
offset direction, image vectors sit elsewhere, around one centre per class: the
"text clustering effect" of the paper, in miniature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


@dataclass(frozen=True)
class SyntheticWorld:
    label_embeddings: np.ndarray  # float32 [N, D]
    dictionary: np.ndarray  # float32 [t, D]
    normal: np.ndarray  # float32 [n, D]
    normal_labels: np.ndarray  # int64 [n]
    test: np.ndarray  # float32 [B, D]


def synthetic_world(
    *,
    classes: int,
    entries: int,
    per_class: int,
    tests: int,
    dim: int = 32,
    seed: int = 0,
) -> SyntheticWorld:
    rng = np.random.default_rng(seed)
    text_offset = rng.normal(size=dim) * 3.0
    image_offset = rng.normal(size=dim) * 3.0
    concepts = rng.normal(size=(classes, dim))
    labels = unit_rows(text_offset + concepts + 0.3 * rng.normal(size=(classes, dim)))
    dictionary = unit_rows(text_offset + rng.normal(size=(entries, dim)))
    normal_labels = np.repeat(np.arange(classes), per_class)
    normal = unit_rows(
        image_offset + concepts[normal_labels] + 0.8 * rng.normal(size=(len(normal_labels), dim))
    )
    test_concepts = np.concatenate([concepts, rng.normal(size=(classes, dim))])
    picks = rng.integers(0, len(test_concepts), size=tests)
    test = unit_rows(image_offset + test_concepts[picks] + 0.8 * rng.normal(size=(tests, dim)))
    return SyntheticWorld(
        label_embeddings=labels.astype(np.float32),
        dictionary=dictionary.astype(np.float32),
        normal=normal.astype(np.float32),
        normal_labels=normal_labels.astype(np.int64),
        test=test.astype(np.float32),
    )
