"""Exact top-k inner-product search over a float32 [t, D] matrix, at matrix-product speed.

The matrix may be a zero-copy view of a memory-mapped FAISS flat index. Entries are
scored a block at a time (one sgemm of the whole query batch against the block), and
each block only adds the entries that beat the running k-th best score of their query,
so selecting costs one comparison per score after the first block instead of a
partition of every row. Ties go to the lower id, whatever the block size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bliss.blas_kernels import CblasScores, numpy_cblas
from bliss.errors import InvalidInputError

if TYPE_CHECKING:
    from bliss.npy_files import NpyRows

# Bounds the [B, block] score buffer, and the rows of a block when they must be copied
# (no numpy CBLAS). Smaller blocks cost more calls and merges: 1,024 queries x 100,000 x
# 512 took 671 ms in blocks of 1,024 rows, 550 ms of 4,096 and 520 ms of 16,384 (this
# bound); one query, 21 ms in one block and 24-31 ms in four on a busy machine.
BLOCK_BYTES = 64 << 20
# Columns of the first block used to bound the first k-th best score; partitioning more
# of them costs more than filtering the few extra candidates this bound lets through.
BOUNDING_COLUMNS = 4096


def top_k_inner_product(
    vectors: np.ndarray | NpyRows,
    queries: np.ndarray,
    k: int,
    *,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` entries of ``vectors`` [t, D] with the largest inner product per query.

    Returns similarities float32 [B, k], most similar first, and ids int64 [B, k]; equal
    scores rank by id. ``vectors`` and ``queries`` must be finite: with NaN scores the
    result is unspecified.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    total, dim = vectors.shape
    if queries.ndim != 2 or queries.shape[1] != dim or not 1 <= k <= total:
        raise InvalidInputError(
            f"cannot search {queries.shape} queries for k={k} in {vectors.shape} vectors: "
            "pass [B, D] queries and 1 <= k <= t"
        )
    best = _RunningTopK(len(queries), k)
    if not len(queries):
        return best.scores, best.ids
    cblas = numpy_cblas()
    direct = cblas is not None and isinstance(vectors, np.ndarray) and CblasScores.accepts(vectors)
    rows = min(total, block_rows or default_block_rows(len(queries), dim, copies=not direct))
    scorer = _BlockScorer(queries, rows, cblas if direct else None)
    for start in range(0, total, rows):
        best.merge(scorer.scores(vectors[start : start + rows]), start)
    return best.scores, best.ids


def default_block_rows(batch: int, dim: int, *, copies: bool = True) -> int:
    """Rows per block so that the scores, and the rows when copied, fit BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (4 * max(batch, dim if copies else 1, 1)))


class _BlockScorer:
    """Scores blocks of rows against the query batch into one reused buffer."""

    def __init__(self, queries: np.ndarray, rows: int, cblas: CblasScores | None) -> None:
        self._queries = queries
        self._buffer = np.empty(len(queries) * rows, dtype=np.float32)
        self._cblas = cblas  # None: numpy.matmul, on aligned copies of unaligned rows
        self._aligned: np.ndarray | None = None

    def scores(self, block: np.ndarray) -> np.ndarray:
        """[B, n] scores of the n rows of ``block``: a view of the buffer, valid until next."""
        batch = len(self._queries)
        out = self._buffer[: batch * len(block)].reshape(batch, len(block))
        if self._cblas is not None:
            self._cblas(self._queries, block, out)
        else:
            np.matmul(self._queries, self._aligned_copy(block).T, out=out)
        return out

    def _aligned_copy(self, block: np.ndarray) -> np.ndarray:
        # numpy.matmul leaves BLAS for a slow loop on unaligned rows (see blas_kernels).
        if block.dtype == np.float32 and block.flags.aligned:
            return block
        if self._aligned is None or len(self._aligned) < len(block):
            self._aligned = np.empty(block.shape, dtype=np.float32)
        aligned = self._aligned[: len(block)]
        np.copyto(aligned, block, casting="same_kind")
        return aligned


class _RunningTopK:
    """The k best (score, id) pairs of each query so far, sorted by score then id."""

    def __init__(self, batch: int, k: int) -> None:
        self.k = k
        self.scores = np.full((batch, k), -np.inf, dtype=np.float32)
        self.ids = np.full((batch, k), -1, dtype=np.int64)

    def merge(self, scores: np.ndarray, offset: int) -> None:
        """Add the [B, n] ``scores`` of ids ``offset``..``offset + n - 1``."""
        # flatnonzero: 2-D nonzero takes 4x as long (43 ms for 1,024 x 16,384 scores).
        hits = np.flatnonzero(scores >= self._entry_bar(scores)[:, None])
        if hits.size == 0:
            return
        rows, columns = np.divmod(hits, scores.shape[1])
        batch = len(self.scores)
        all_rows = np.concatenate([np.repeat(np.arange(batch), self.k), rows])
        all_scores = np.concatenate([self.scores.ravel(), scores[rows, columns]])
        all_ids = np.concatenate([self.ids.ravel(), columns + offset])
        order = np.lexsort((all_ids, -all_scores, all_rows))
        # Sorted by row first, each query's run starts after the runs of the rows before
        # it, and holds at least its k current best.
        counts = np.bincount(all_rows, minlength=batch)
        starts = np.cumsum(counts) - counts
        keep = order[(starts[:, None] + np.arange(self.k)).ravel()]
        self.scores = all_scores[keep].reshape(batch, self.k)
        self.ids = all_ids[keep].reshape(batch, self.k)

    def _entry_bar(self, scores: np.ndarray) -> np.ndarray:
        """Per query, a score below which no entry of this block can make the top k."""
        bar = self.scores[:, -1]
        head = scores[:, :BOUNDING_COLUMNS]
        if np.isneginf(bar).any() and head.shape[1] >= self.k:
            # Until k entries are in, the k-th best of the block's first columns bounds it.
            kth = head.shape[1] - self.k
            bar = np.maximum(bar, np.partition(head, kth, axis=1)[:, kth])
        return bar
