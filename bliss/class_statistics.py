"""Per-class similarity statistics: eq. 4 (class labels) and eq. 8 (dictionary entries).

For a normal class i with normal embeddings z_j and any unit vector d (a class label or a
dictionary entry), we need the mean and population std (ddof = 0) of sim(z_j, d) = z_j . d.
Two exact paths compute them:

- **direct**: form the similarities and reduce them, chunked over images and entries so
  memory stays bounded for any dictionary size (cost n_i * t * D);
- **moments**: mu(d) = d . m and sigma(d)^2 = d^T S d from the class's running mean m and
  covariance S (cost t * D^2, independent of n_i), which also lets normal images be added
  to a class later without seeing the earlier ones again.

Everything is accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from bliss.errors import InvalidInputError

if TYPE_CHECKING:
    from bliss.npy_files import NpyRows

# Working-set cap for one block of float64 similarities or projections.
DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024


class StatisticsPath(str, Enum):
    AUTO = "auto"
    DIRECT = "direct"
    MOMENTS = "moments"


@dataclass(frozen=True)
class ClassMoments:
    """Count, mean and centred scatter of one class's normal embeddings (float64).

    The scatter is sum((z - mean)(z - mean)^T), kept centred and merged with Chan et
    al.'s pairwise update: the raw form sum(z z^T) / n - mean mean^T cancels badly for
    unit vectors whose per-direction spread is tiny next to their mean.
    """

    count: int
    mean_vector: np.ndarray  # [D]
    scatter: np.ndarray  # [D, D], centred

    @classmethod
    def empty(cls, dim: int) -> ClassMoments:
        return cls(0, np.zeros(dim, dtype=np.float64), np.zeros((dim, dim), dtype=np.float64))

    @classmethod
    def of(cls, embeddings: np.ndarray) -> ClassMoments:
        z = np.asarray(embeddings, dtype=np.float64)
        if z.ndim != 2:
            raise InvalidInputError(f"embeddings of shape {z.shape} are not an [n, D] matrix")
        if z.shape[0] == 0:
            return cls.empty(z.shape[1])
        mean = z.mean(axis=0)
        centred = z - mean
        return cls(z.shape[0], mean, centred.T @ centred)

    @classmethod
    def from_covariance(cls, count: int, mean: np.ndarray, covariance: np.ndarray) -> ClassMoments:
        """Moments as stored: population covariance = scatter / count."""
        return cls(count, np.asarray(mean, np.float64), np.asarray(covariance, np.float64) * count)

    @property
    def dim(self) -> int:
        return int(self.mean_vector.shape[0])

    def add(self, embeddings: np.ndarray) -> ClassMoments:
        """These moments with ``embeddings`` [n, D] folded in (self is left unchanged)."""
        z = np.asarray(embeddings, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise InvalidInputError(
                f"embeddings of shape {z.shape} do not match dimension {self.dim}"
            )
        if z.shape[0] == 0:
            return self
        return self.merge(ClassMoments.of(z))

    def merge(self, other: ClassMoments) -> ClassMoments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean_vector - self.mean_vector
        return ClassMoments(
            count,
            self.mean_vector + delta * (other.count / count),
            self.scatter
            + other.scatter
            + np.outer(delta, delta) * (self.count * other.count / count),
        )

    @property
    def mean(self) -> np.ndarray:
        self._require_samples()
        return self.mean_vector

    @property
    def covariance(self) -> np.ndarray:
        """Population (ddof = 0) covariance."""
        self._require_samples()
        return self.scatter / self.count

    def _require_samples(self) -> None:
        if self.count == 0:
            raise InvalidInputError("a class needs at least one normal embedding")


@dataclass(frozen=True)
class SimilarityStatistics:
    """Mean and population std of sim(z, d) over a class's normal images, one per vector d."""

    mean: np.ndarray  # float64 [t]
    std: np.ndarray  # float64 [t]


def direct_statistics(
    normal: np.ndarray,
    vectors: np.ndarray | NpyRows,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> SimilarityStatistics:
    """Eqs. 4/8 straight from the similarities of ``normal`` [n, D] to ``vectors`` [t, D].

    Blocks of images are merged with Chan et al.'s pairwise update, so the result is as
    exact as a two-pass std whatever the block sizes.
    """
    n = normal.shape[0]
    if n == 0:
        raise InvalidInputError("a class needs at least one normal embedding")
    image_rows = max(1, min(n, block_bytes // (8 * 1024)))
    entry_rows = max(1, block_bytes // (8 * image_rows))
    mean = np.empty(vectors.shape[0], dtype=np.float64)
    std = np.empty(vectors.shape[0], dtype=np.float64)
    for start, block in _row_blocks(vectors, entry_rows):
        block_mean, block_m2 = _merged_mean_m2(normal, image_rows, block.T)
        mean[start : start + len(block)] = block_mean
        std[start : start + len(block)] = np.sqrt(block_m2 / n)
    return SimilarityStatistics(mean, std)


def moment_statistics(
    moments: ClassMoments,
    vectors: np.ndarray | NpyRows,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> SimilarityStatistics:
    """Eqs. 4/8 from moments: mu(d) = d . m, sigma(d)^2 = d^T S d (float64)."""
    mean_vector = moments.mean
    covariance = moments.covariance
    rows = max(1, block_bytes // (8 * moments.dim))
    mean = np.empty(vectors.shape[0], dtype=np.float64)
    std = np.empty(vectors.shape[0], dtype=np.float64)
    for start, block in _row_blocks(vectors, rows):
        stop = start + len(block)
        mean[start:stop], std[start:stop] = _moment_mean_std(mean_vector, covariance, block)
    return SimilarityStatistics(mean, std)


def stacked_moment_statistics(
    means: np.ndarray, covariances: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8 of every class at a few vectors: what moments mode computes per request.

    ``means`` [N, D] and ``covariances`` [N, D, D] are the classes' moments, ``vectors``
    [u, D] the dictionary entries hit; returns mean and std, float64 [N, u].
    """
    return _moment_mean_std(means, covariances, np.asarray(vectors, dtype=np.float64))


def _moment_mean_std(
    mean_vector: np.ndarray, covariance: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """mu = v . m and sigma = sqrt(v' S v) for rows v; broadcasts over leading class axes."""
    mean = vectors @ mean_vector[..., :, None]
    variance = np.einsum("...td,td->...t", vectors @ covariance, vectors)
    # Rounding can leave a zero variance (one image, identical images) a hair below 0.
    return mean[..., 0], np.sqrt(np.maximum(variance, 0.0))


def cheaper_path(sample_count: int, dim: int) -> StatisticsPath:
    """Direct costs n*t*D, moments t*D^2 (moments are kept anyway): direct wins iff n < D."""
    return StatisticsPath.DIRECT if sample_count < dim else StatisticsPath.MOMENTS


@dataclass(frozen=True)
class ClassStatistics:
    """Everything the scorer needs about one normal class."""

    label_mean: float  # eq. 4
    label_std: float
    entry_mean: np.ndarray  # eq. 8, float64 [t]
    entry_std: np.ndarray
    path: StatisticsPath  # the path that computed them


def class_statistics(
    label_embedding: np.ndarray,
    dictionary: np.ndarray | NpyRows,
    moments: ClassMoments,
    normal: np.ndarray | None = None,
    *,
    path: StatisticsPath = StatisticsPath.AUTO,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> ClassStatistics:
    """Eq. 4 for the class label and eq. 8 for every dictionary entry of one class.

    ``moments`` must describe ``normal`` when both are given. ``path`` AUTO picks the
    cheaper one; the direct path needs ``normal``.
    """
    if path is StatisticsPath.AUTO:
        path = cheaper_path(moments.count, moments.dim)
        if normal is None:
            path = StatisticsPath.MOMENTS
    if path is StatisticsPath.DIRECT:
        if normal is None:
            raise InvalidInputError("the direct statistics path needs the normal embeddings")
        label = direct_statistics(normal, label_embedding[None, :], block_bytes=block_bytes)
        entries = direct_statistics(normal, dictionary, block_bytes=block_bytes)
    else:
        label = moment_statistics(moments, label_embedding[None, :], block_bytes=block_bytes)
        entries = moment_statistics(moments, dictionary, block_bytes=block_bytes)
    return ClassStatistics(
        label_mean=float(label.mean[0]),
        label_std=float(label.std[0]),
        entry_mean=entries.mean,
        entry_std=entries.std,
        path=path,
    )


@dataclass(frozen=True)
class StatisticsTable:
    """Statistics of all N classes, as the scorer holds them in memory."""

    label_mean: np.ndarray  # [N]
    label_std: np.ndarray  # [N]
    entry_mean: np.ndarray  # [N, t]
    entry_std: np.ndarray  # [N, t]

    @classmethod
    def stack(cls, per_class: list[ClassStatistics]) -> StatisticsTable:
        return cls(
            label_mean=np.array([c.label_mean for c in per_class], dtype=np.float64),
            label_std=np.array([c.label_std for c in per_class], dtype=np.float64),
            entry_mean=np.stack([c.entry_mean for c in per_class]),
            entry_std=np.stack([c.entry_std for c in per_class]),
        )


def statistics_table(
    normal: np.ndarray,
    labels: np.ndarray,
    label_embeddings: np.ndarray,
    dictionary: np.ndarray,
    *,
    path: StatisticsPath = StatisticsPath.AUTO,
) -> StatisticsTable:
    """All classes at once from a labelled normal bank (``labels`` index label_embeddings)."""
    per_class = []
    for position, label_embedding in enumerate(label_embeddings):
        members = normal[labels == position]
        per_class.append(
            class_statistics(
                label_embedding, dictionary, ClassMoments.of(members), members, path=path
            )
        )
    return StatisticsTable.stack(per_class)


def _row_blocks(array: np.ndarray | NpyRows, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, array.shape[0], rows):
        yield start, np.asarray(array[start : start + rows], dtype=np.float64)


def _merged_mean_m2(
    normal: np.ndarray, image_rows: int, vectors_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sum of squared deviations of normal @ vectors_t, merged block by block."""
    count = 0
    mean = np.zeros(vectors_t.shape[1], dtype=np.float64)
    m2 = np.zeros(vectors_t.shape[1], dtype=np.float64)
    for _, block in _row_blocks(normal, image_rows):
        similarities = block @ vectors_t
        block_count = similarities.shape[0]
        block_mean = similarities.mean(axis=0)
        block_m2 = np.square(similarities - block_mean).sum(axis=0)
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + block_m2 + np.square(delta) * (count * block_count / total)
        count = total
    return mean, m2
