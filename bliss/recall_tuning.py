"""Tune approximate search to a recall target: ``--target-recall R``.

Recall@K is measured against exact inner-product search, with (a bounded sample of) the
version's own normal images as queries. The search parameter of the approximate kind
(``nprobe`` for ivf/ivfpq, ``efSearch`` for hnsw) is raised to the smallest value whose
recall reaches R, like autofaiss's hyperparameter search (which bisects the whole
range): search cost grows with the parameter and recall nearly so, so doubling and then
bisection find it in O(log) searches, the cheap small values first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bliss.dictionary_index import DictionaryIndex, IndexKind
from bliss.errors import InvalidInputError
from bliss.flat_search import top_k_inner_product

if TYPE_CHECKING:
    import faiss

    from bliss.npy_files import NpyRows

# Recall on 2,000 queries has a standard error of at most sqrt(0.25 / 2000) = 0.011 (at
# K = 1; less for larger K); more queries only slow the tuning down.
MAX_TUNING_QUERIES = 2_000
# faiss warns below 39 training points per centroid, so nlist never exceeds t / 39.
MIN_POINTS_PER_CENTROID = 39
# Top of the efSearch range (autofaiss goes to 16,383): an HNSW index that needs more
# visits so many nodes per query that ivf or flat is the better kind.
HNSW_EF_CAP = 4_096
HNSW_EF_CAP_PER_K = 16
NO_PARAMETER = "none"


def default_nlist(entries: int) -> int:
    """The number of IVF lists for a dictionary of ``entries`` vectors.

    autofaiss's rule (``get_optimal_nb_clusters`` in autofaiss/external/optimize.py,
    after the faiss wiki "Guidelines to choose an index"): below 1M vectors, 4 * sqrt(t)
    rounded to a power of two; 16,384 below 10M; 65,536 below 300M; 131,072 beyond.
    """
    if entries < 1:
        raise InvalidInputError(f"the dictionary has {entries} entries: nlist needs at least 1")
    if entries < 1_000_000:
        nlist = 2 ** round(math.log2(4 * math.sqrt(entries)))
    elif entries < 10_000_000:
        nlist = 16_384
    elif entries < 300_000_000:
        nlist = 65_536
    else:
        nlist = 131_072
    return max(1, min(nlist, entries // MIN_POINTS_PER_CENTROID))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / K, for int64 id matrices [Q, K].

    Missing results (faiss's id -1) count as misses.
    """
    if approx_ids.shape != exact_ids.shape or approx_ids.ndim != 2 or approx_ids.size == 0:
        raise InvalidInputError(
            f"recall needs two non-empty [Q, K] id matrices of one shape, got "
            f"{approx_ids.shape} and {exact_ids.shape}"
        )
    if exact_ids.min() < 0:
        raise InvalidInputError("exact ids contain -1: compute them with exact_neighbours")
    # Offsetting each row's ids by row * span turns the per-row intersections into one
    # set membership test over the whole matrix.
    span = int(max(approx_ids.max(), exact_ids.max())) + 1
    offsets = np.arange(len(exact_ids), dtype=np.int64)[:, None] * span
    found = np.isin(approx_ids + offsets, exact_ids + offsets) & (approx_ids >= 0)
    return float(found.mean())


def sample_queries(
    queries: np.ndarray, limit: int = MAX_TUNING_QUERIES, seed: int = 0
) -> np.ndarray:
    """At most ``limit`` rows of ``queries`` (a memory map is fine), seeded, as float32."""
    if limit < 1:
        raise InvalidInputError(f"query limit {limit} must be at least 1")
    if len(queries) <= limit:
        return np.ascontiguousarray(queries, dtype=np.float32)
    # Sorted positions read a memory map front to back.
    picked = np.sort(np.random.default_rng(seed).choice(len(queries), size=limit, replace=False))
    return np.ascontiguousarray(queries[picked], dtype=np.float32)


def exact_neighbours(vectors: np.ndarray | NpyRows, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` ids [Q, k] by inner product, most similar first (ties: lower id).

    ``vectors`` [t, D] may be a memory map of many millions of rows: it is read in blocks
    and only the running top-k is kept, so memory stays bounded.
    """
    _check_vectors(vectors, queries, k)
    return top_k_inner_product(vectors, queries, k)[1]


class ExactSearch:
    """Exact eq. 7 over a dictionary's vectors: the reference approximate search is held to.

    Answers like ``reference`` (a DictionaryIndex over the same dictionary) would with
    perfect recall: exact ids, similarities re-scored in float64 from its exact vectors.
    """

    def __init__(self, vectors: np.ndarray | NpyRows, reference: DictionaryIndex) -> None:
        self.vectors = vectors  # [t, D]; a memory map or NpyRows is read block by block
        self.reference = reference

    @property
    def dim(self) -> int:
        return self.reference.dim

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.reference.rescore(queries, exact_neighbours(self.vectors, queries, k))


@dataclass(frozen=True)
class SearchParameter:
    """The knob that trades an approximate index's speed for recall."""

    name: str  # faiss ParameterSpace name: "nprobe" or "efSearch"
    lowest: int
    highest: int

    def apply(self, index: faiss.Index, value: int) -> None:
        import faiss

        # ParameterSpace also reaches through IndexShards, IndexPreTransform, IndexRefine.
        faiss.ParameterSpace().set_index_parameter(index, self.name, value)


def search_parameter(index: faiss.Index, kind: IndexKind, k: int) -> SearchParameter | None:
    """The search parameter of ``kind`` and its sensible range for top-``k``; None for flat."""
    import faiss

    if kind is IndexKind.FLAT:
        return None
    if kind is IndexKind.HNSW:
        if not hasattr(index, "hnsw"):
            raise _kind_mismatch(index, kind)
        # faiss searches with max(efSearch, k): below k the parameter does nothing.
        highest = min(index.ntotal, max(HNSW_EF_CAP, HNSW_EF_CAP_PER_K * k))
        return SearchParameter("efSearch", k, highest)
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError as error:
        raise _kind_mismatch(index, kind) from error
    return SearchParameter("nprobe", 1, nlist)


@dataclass(frozen=True)
class SearchTuning:
    """What ``tune_search`` chose and the recall@K it measured with it."""

    parameter: str  # "nprobe", "efSearch", or "none" for flat
    value: int
    recall: float
    target: float
    # Largest |BLISS score - exact-search BLISS score| on the queries, once measured.
    max_score_change: float | None = None

    @property
    def reached(self) -> bool:
        return self.recall >= self.target


def tune_search(
    index: faiss.Index,
    kind: IndexKind,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    k: int,
    target: float,
    *,
    search: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> SearchTuning:
    """Set the smallest search parameter whose recall@``k`` on ``queries`` reaches ``target``.

    ``exact_ids`` [Q, k] is the exact answer (``exact_neighbours``). A value only counts
    as reaching the target when every query also gets k results, since the service
    refuses incomplete answers. ``search`` (queries, k) -> ids is what is measured
    (default: the faiss index's own search), e.g. a DictionaryIndex that re-ranks IVF-PQ
    candidates exactly. When no value reaches it (IVF-PQ's quantisation caps
    recall), the index is left at the value with the best recall seen, and the result
    says so through ``reached``; the caller decides whether that is an error.
    """
    _check_target(target)
    _check_queries(index, queries, exact_ids, k)
    parameter = search_parameter(index, kind, k)
    if parameter is None:
        return SearchTuning(NO_PARAMETER, 0, 1.0, target)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    measured: dict[int, tuple[bool, float]] = {}

    def searched(value: int) -> np.ndarray:
        parameter.apply(index, value)
        if search is None:
            return index.search(queries, k)[1]
        try:
            return search(queries, k)
        except InvalidInputError:  # fewer than k hits for some query: an incomplete answer
            return np.full(exact_ids.shape, -1, dtype=np.int64)

    def reaches(value: int) -> bool:
        ids = searched(value)
        measured[value] = (bool((ids >= 0).all()), recall_at_k(ids, exact_ids))
        complete, recall = measured[value]
        return complete and recall >= target

    value = _smallest_reaching(reaches, parameter.lowest, parameter.highest)
    if value is None:
        # Complete answers first, then the best recall, then the cheapest value.
        value = max(measured, key=lambda candidate: (*measured[candidate], -candidate))
    # Bisection may have ended on a failing probe: set the chosen value again.
    parameter.apply(index, value)
    return SearchTuning(parameter.name, value, measured[value][1], target)


def _smallest_reaching(reaches: Callable[[int], bool], lowest: int, highest: int) -> int | None:
    """Doubling from ``lowest`` until ``reaches``, then bisection; None if ``highest`` fails."""
    failing, value = lowest - 1, lowest
    while not reaches(value):
        if value >= highest:
            return None
        failing, value = value, min(2 * value, highest)
    while value - failing > 1:
        middle = (failing + value) // 2
        if reaches(middle):
            value = middle
        else:
            failing = middle
    return value


def _check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise InvalidInputError(
            f"target recall {target} must be in (0, 1]: pass e.g. --target-recall 0.95"
        )


def _check_queries(index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray, k: int) -> None:
    if not 1 <= k <= index.ntotal:
        raise InvalidInputError(f"K={k} must be between 1 and the dictionary size {index.ntotal}")
    if queries.ndim != 2 or queries.shape[1] != index.d or len(queries) == 0:
        raise InvalidInputError(
            f"tuning queries have shape {queries.shape}, expected non-empty [Q, {index.d}]"
        )
    if exact_ids.shape != (len(queries), k):
        raise InvalidInputError(
            f"exact ids have shape {exact_ids.shape}, expected [{len(queries)}, {k}]: "
            "compute them with exact_neighbours on the same queries and K"
        )


def _check_vectors(vectors: np.ndarray | NpyRows, queries: np.ndarray, k: int) -> int:
    if vectors.ndim != 2 or queries.ndim != 2 or vectors.shape[1] != queries.shape[1]:
        raise InvalidInputError(
            f"exact search needs [t, D] vectors and [Q, D] queries, got {vectors.shape} "
            f"and {queries.shape}"
        )
    if not 1 <= k <= len(vectors):
        raise InvalidInputError(f"K={k} must be between 1 and the dictionary size {len(vectors)}")
    return len(vectors)


def _kind_mismatch(index: faiss.Index, kind: IndexKind) -> InvalidInputError:
    return InvalidInputError(
        f"the index is a faiss {type(index).__name__}, not a {kind.value} index: "
        "pass the kind the index was built with"
    )
