"""The dictionary as a FAISS inner-product index: the top-K search of eq. 7.

Embeddings are L2-normalised, so inner product is the cosine similarity of the spec.
``flat`` is exact and the default; ``ivf``, ``hnsw`` and ``ivfpq`` trade exactness for
speed and memory on dictionaries of many millions of entries. Files are written to a
temporary name, fsynced and renamed, so a crash never leaves a torn index behind.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

import numpy as np

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError, NotFoundError
from bliss.flat_search import top_k_inner_product
from bliss.npy_files import iter_row_chunks, npy_layout

if TYPE_CHECKING:
    import faiss
    from faiss import IndexHNSW

    from bliss.gpu_index import GpuOptions

# Where faiss still scans a flat list itself (IVF's coarse quantiser), query batches of
# at least this many rows are scored with one BLAS matrix product. faiss 1.1x defaults
# to 128,000, which sends every realistic batch to its scalar scan: measured with
# faiss-cpu 1.15.1 on 2 cores, 64 queries x 100,000 x 512 took 752 ms that way and 88 ms
# through BLAS (1,850 entries: 4.7 ms and 1.6 ms). Single queries stay on the scan,
# which is faster for them. CPU flat search itself runs in bliss.flat_search on numpy's
# BLAS instead of faiss's (see bliss.blas_kernels).
BLAS_QUERY_THRESHOLD = 20
ADD_BATCH_ROWS = 65_536
EXACT_RESCORE_BYTES = 1 << 20
# IVF-PQ with exact vectors fetches this many candidates per wanted hit and re-ranks them
# exactly: PQ distances alone misorder near neighbours (recall@10 of about 0.3 with
# 8-bit codes at D/8 sub-quantisers on clustered data).
PQ_RERANK_FACTOR = 10
# faiss wants ~39 training points per centroid; more buys little and costs time.
TRAINING_POINTS_PER_CENTROID = 64


class IndexKind(str, Enum):
    FLAT = "flat"  # exact inner product
    IVF = "ivf"  # inverted lists of exact vectors: fast, approximate by nprobe
    HNSW = "hnsw"  # graph: fast, approximate by ef_search; CPU only
    IVFPQ = "ivfpq"  # inverted lists of product-quantised codes: smallest memory

    @property
    def stores_exact_vectors(self) -> bool:
        return self is not IndexKind.IVFPQ


@dataclass(frozen=True)
class IndexOptions:
    """How to build the index; fields that do not apply to ``kind`` are ignored."""

    kind: IndexKind = IndexKind.FLAT
    nlist: int | None = None  # IVF lists; default about 4 * sqrt(t)
    nprobe: int = 32  # IVF lists searched per query
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_search: int = 128  # HNSW search breadth
    pq_m: int | None = None  # PQ sub-quantisers; default D / 8 (must divide D)

    def factory_string(self, dim: int, ntotal: int) -> str:
        """The faiss index_factory description of this index for t = ntotal entries."""
        nlist = self.nlist or max(1, min(ntotal // 39, int(4 * math.sqrt(ntotal))))
        if self.kind is IndexKind.FLAT:
            return "Flat"
        if self.kind is IndexKind.IVF:
            return f"IVF{nlist},Flat"
        if self.kind is IndexKind.HNSW:
            return f"HNSW{self.hnsw_m},Flat"
        pq_m = self.pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise InvalidInputError(f"pq_m={pq_m} must divide the embedding dimension {dim}")
        # "np": no polysemous training, which costs most of the build and that search,
        # without a polysemous threshold, never uses.
        return f"IVF{nlist},PQ{pq_m}x8np"


def build_index(
    embeddings: np.ndarray | Path,
    options: IndexOptions | None = None,
    *,
    on_progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> DictionaryIndex:
    """Index ``embeddings`` [t, D]: an array, or the path of an .npy file.

    From a file, rows are read chunk by chunk with plain reads (not a memory map, whose
    pages would stay in the resident set): the build holds the index plus one chunk.
    ``on_progress`` is called with the number of rows added after every batch.
    """
    faiss = _faiss()

    options = options or IndexOptions()
    rows, dim = _check_matrix(embeddings)
    description = options.factory_string(dim, rows)
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(_training_sample(embeddings, index, seed))
    _apply_search_options(index, options)
    if options.kind is IndexKind.FLAT:
        _fill_flat(index, embeddings, rows, on_progress)
    else:
        for _, batch in _row_batches(embeddings, ADD_BATCH_ROWS):
            index.add(batch)
            if on_progress is not None:
                on_progress(len(batch))
    if options.kind is IndexKind.IVF:
        # Lets search() reconstruct the top-K vectors to report exact similarities.
        faiss.extract_index_ivf(index).make_direct_map()
    return DictionaryIndex(index, options.kind)


def extended_index(
    path: Path,
    kind: IndexKind,
    batches: Iterable[np.ndarray],
    *,
    on_progress: Callable[[int], None] | None = None,
) -> DictionaryIndex:
    """The index in ``path`` with ``batches`` of rows added (ids continue from ntotal).

    Read into memory, not mapped, since it changes; a trained quantiser is kept as is.
    """
    faiss = _faiss()

    index = faiss.read_index(str(path))
    for batch in batches:
        index.add(np.ascontiguousarray(batch, dtype=np.float32))
        if on_progress is not None:
            on_progress(len(batch))
    if kind is IndexKind.IVF:
        faiss.extract_index_ivf(index).make_direct_map()
    return DictionaryIndex(index, kind)


def _fill_flat(
    index: faiss.IndexFlat,
    embeddings: np.ndarray | Path,
    rows: int,
    on_progress: Callable[[int], None] | None,
) -> None:
    """Copy the rows straight into a flat index's storage, sized once.

    ``add`` grows faiss's code vector by reallocation, which briefly holds the old and
    the new buffer: up to 1.75x the dictionary at the peak (measured at 5M x 512).
    """
    faiss = _faiss()

    size = rows * index.d * 4
    index.codes.resize(size)
    storage = faiss.rev_swig_ptr(index.codes.data(), size).view(np.float32)
    storage = storage.reshape(rows, index.d)
    for start, batch in _row_batches(embeddings, ADD_BATCH_ROWS):
        storage[start : start + len(batch)] = batch
        if on_progress is not None:
            on_progress(len(batch))
    index.ntotal = rows


def _row_batches(embeddings: np.ndarray | Path, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Contiguous float32 batches of ``rows`` rows, with their start row."""
    if isinstance(embeddings, Path):
        for start, batch in iter_row_chunks(embeddings, chunk_bytes=rows * _row_bytes(embeddings)):
            yield start, np.ascontiguousarray(batch, dtype=np.float32)
        return
    for start in range(0, embeddings.shape[0], rows):
        batch = embeddings[start : start + rows]
        yield start, np.ascontiguousarray(batch, dtype=np.float32)


def _row_bytes(path: Path) -> int:
    shape, dtype, _ = npy_layout(path)
    return int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


class DictionaryIndex:
    """A searchable dictionary: ids are dictionary positions 0..t-1."""

    def __init__(
        self, index: faiss.Index, kind: IndexKind, exact_vectors: np.ndarray | None = None
    ) -> None:
        self.index = index
        self.kind = kind
        # IVF-PQ keeps only codes: its exact float32 [t, D] vectors come from a separate
        # (memory-mapped) copy, the version's serving artifacts.
        self.exact_vectors = exact_vectors

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def vectors(self) -> np.ndarray | None:
        """The exact float32 [t, D] entries as one array, without copying, or None.

        A read-only view of a flat (or HNSW) CPU index's own rows, which are the mapped
        file when loaded memory-mapped, else the ``exact_vectors`` given; None for IVF
        (rows kept by list) and GPU indexes. Valid until the faiss index is changed.
        """
        storage = _flat_storage(self.index)
        if storage is None:
            return self.exact_vectors
        return _rows_view(storage, owner=self.index)

    def vectors_at(self, ids: np.ndarray) -> np.ndarray:
        """Exact float32 vectors [u, D] of entries ``ids`` (re-scoring, moments mode)."""
        rows = self.vectors
        if rows is not None:
            return np.asarray(rows[ids], dtype=np.float32)
        if not self.kind.stores_exact_vectors:
            raise InvalidInputError(
                f"this {self.kind.value} index keeps no exact vectors: load it with its "
                "version's serving artifacts (bliss.version_loader.load_scorer)"
            )
        return self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Eq. 7: the ``k`` most similar entries of each query, most similar first.

        Returns similarities [B, k] and ids int64 [B, k]. When the index keeps the exact
        vectors, the similarities are recomputed in float64 from them: faiss's float32
        scores, divided by small per-class sigmas, would cost the score digits it needs.
        """
        check_search(queries, k, self.dim, self.ntotal)
        rerank = self.kind is IndexKind.IVFPQ and self.exact_vectors is not None
        wanted = min(self.ntotal, k * PQ_RERANK_FACTOR) if rerank else k
        similarities, ids = self._top_k(np.ascontiguousarray(queries, dtype=np.float32), wanted)
        if ((ids >= 0).sum(axis=1) < k).any():
            raise InvalidInputError(
                f"the {self.kind.value} index found fewer than K={k} entries for some inputs: "
                "lower K or rebuild the index with a larger --nprobe"
            )
        if rerank:
            return self._reranked(queries, ids, k)
        if not self.kind.stores_exact_vectors:
            return similarities, ids
        return self.rescore(queries, ids)

    def _reranked(
        self, queries: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of ``candidates`` [B, c] by exact similarity (-1: no candidate)."""
        # Missing candidates repeat the row's best one; repeats are then pushed past k.
        filled = np.where(candidates >= 0, candidates, candidates[:, :1])
        similarities, ids = self.rescore(queries, filled)
        repeated = np.zeros(ids.shape, dtype=bool)
        repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
        order = np.argsort(repeated, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(similarities, order, 1), np.take_along_axis(ids, order, 1)

    def _top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 top-k: exact flat search on the CPU runs on numpy's BLAS (flat_search)."""
        if self.kind is IndexKind.FLAT and _searches_inner_product(self.index):
            rows = self.vectors
            if rows is not None:
                return top_k_inner_product(rows, queries, k)
        return self.index.search(queries, k)

    def rescore(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 similarities of ``ids`` [B, k] from the exact vectors, most similar first."""
        unique, inverse = np.unique(ids, return_inverse=True)
        vectors = self.vectors_at(unique).astype(np.float64)
        positions = inverse.reshape(ids.shape)
        queries = queries.astype(np.float64)
        similarities = np.empty(ids.shape, dtype=np.float64)
        # Row blocks keep the gathered [rows, k, D] float64 vectors small (about 1 MiB).
        rows = max(1, EXACT_RESCORE_BYTES // (8 * ids.shape[1] * self.dim))
        for start in range(0, len(ids), rows):
            block = slice(start, start + rows)
            similarities[block] = np.einsum("bd,bkd->bk", queries[block], vectors[positions[block]])
        return most_similar_first(similarities, ids)

    def to_gpus(self, options: GpuOptions | None = None) -> DictionaryIndex:
        """A copy searched on every visible GPU, or self when it stays on the CPU.

        See bliss.gpu_index: no GPU, faiss without GPU support, and HNSW stay on the CPU.
        """
        from bliss.gpu_index import place_on_gpus

        placed = place_on_gpus(self.index, options)
        if placed is self.index:
            return self
        # A GpuSearchIndex stands in for a faiss index here (it has what DictionaryIndex uses
        # of one on the GPU path: d, ntotal, search, reconstruct_batch).
        return DictionaryIndex(cast("faiss.Index", placed), self.kind, self.exact_vectors)

    def save(self, path: Path) -> str:
        """Write to ``path`` atomically (temp file, fsync, rename); returns the sha256."""
        faiss = _faiss()

        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and _is_gpu_index(index):
            index = faiss.index_gpu_to_cpu(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        faiss.write_index(index, str(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
        return file_sha256(path)

    @classmethod
    def load(
        cls,
        path: Path,
        kind: IndexKind,
        *,
        expected_checksum: str | None = None,
        memory_map: bool = True,
        exact_vectors: np.ndarray | None = None,
    ) -> DictionaryIndex:
        """Read an index file, memory-mapped by default, verifying its checksum when given."""
        faiss = _faiss()

        if not path.is_file():
            raise NotFoundError(f"FAISS index file {path} is missing: rebuild the index version")
        if expected_checksum is not None:
            actual = file_sha256(path)
            if actual != expected_checksum:
                raise InvalidInputError(
                    f"FAISS index file {path} has sha256 {actual[:12]}..., the store expects "
                    f"{expected_checksum[:12]}...: the file was changed or replaced; "
                    "rebuild the version"
                )
        # IO_FLAG_MMAP copies flat and HNSW rows into memory (2.3 GB private at 1M x 512);
        # IO_FLAG_MMAP_IFC (faiss >= 1.14) maps them, and maps IVF lists as well as it does.
        mapped = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
        flags = mapped | faiss.IO_FLAG_READ_ONLY if memory_map else 0
        return cls(faiss.read_index(str(path), flags), kind, exact_vectors)


def check_search(queries: np.ndarray, k: int, dim: int, ntotal: int) -> None:
    """The eq. 7 search's preconditions, whatever store answers it."""
    if not 1 <= k <= ntotal:
        raise InvalidInputError(f"K={k} must be between 1 and the dictionary size {ntotal}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InvalidInputError(f"query embeddings have shape {queries.shape}, expected [B, {dim}]")


def most_similar_first(similarities: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of exact similarities [B, k] and its ids sorted most similar first; equal
    similarities by lower id, so that every store ranks ties the same way."""
    order = np.lexsort((ids, -similarities), axis=1)
    return np.take_along_axis(similarities, order, 1), np.take_along_axis(ids, order, 1)


@functools.cache
def _faiss() -> ModuleType:
    """The faiss module, configured once (imported lazily: it is not needed to start)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = BLAS_QUERY_THRESHOLD
    return faiss


def _check_matrix(embeddings: np.ndarray | Path) -> tuple[int, int]:
    shape = npy_layout(embeddings)[0] if isinstance(embeddings, Path) else embeddings.shape
    if len(shape) != 2 or shape[0] == 0:
        raise InvalidInputError(
            f"dictionary embeddings must be a non-empty [t, D] matrix, got {tuple(shape)}"
        )
    return int(shape[0]), int(shape[1])


def _training_sample(embeddings: np.ndarray | Path, index: faiss.Index, seed: int) -> np.ndarray:
    """A seeded sample of rows, enough for the coarse quantiser (and PQ) to train on."""
    faiss = _faiss()

    ivf = faiss.extract_index_ivf(index)
    wanted = max(ivf.nlist * TRAINING_POINTS_PER_CENTROID, 256 * 39)
    rows, _ = _check_matrix(embeddings)
    if rows <= wanted:
        return np.concatenate([batch for _, batch in _row_batches(embeddings, ADD_BATCH_ROWS)])
    picked = np.sort(np.random.default_rng(seed).choice(rows, size=wanted, replace=False))
    sample = []
    for start, batch in _row_batches(embeddings, ADD_BATCH_ROWS):
        inside = picked[(picked >= start) & (picked < start + len(batch))]
        sample.append(batch[inside - start])
    return np.concatenate(sample)


def _apply_search_options(index: faiss.Index, options: IndexOptions) -> None:
    faiss = _faiss()

    if options.kind in (IndexKind.IVF, IndexKind.IVFPQ):
        faiss.extract_index_ivf(index).nprobe = options.nprobe
    elif options.kind is IndexKind.HNSW:
        # HNSW indexes are built as IndexHNSWFlat (Index has no hnsw in faiss's stubs).
        cast("IndexHNSW", index).hnsw.efSearch = options.ef_search


def _searches_inner_product(index: faiss.Index) -> bool:
    # GPU wrappers (bliss.gpu_index) have no metric_type: they search on the GPU.
    metric = getattr(index, "metric_type", None)
    return metric is not None and int(metric) == _faiss().METRIC_INNER_PRODUCT


def _flat_storage(index: faiss.Index) -> faiss.IndexFlat | None:
    """The CPU IndexFlat holding every row in id order: the index itself, or HNSW's."""
    faiss = _faiss()

    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return index if isinstance(index, faiss.IndexFlat) else None


class _IndexRows:
    """Exposes a faiss flat index's rows to numpy and keeps the index alive meanwhile.

    The array's ``base`` is this object, so a view outliving the DictionaryIndex still
    holds the faiss index (and with it the file mapping) it points into.
    """

    def __init__(self, storage: faiss.IndexFlat, owner: faiss.Index) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "data": (int(storage.get_xb()), True),  # read-only: the mapping is PROT_READ
            "shape": (int(storage.ntotal), int(storage.d)),
            "typestr": np.dtype(np.float32).str,
            "version": 3,
        }


def _rows_view(storage: faiss.IndexFlat, owner: faiss.Index) -> np.ndarray:
    if storage.ntotal == 0:
        return np.empty((0, int(storage.d)), dtype=np.float32)
    return np.asarray(_IndexRows(storage, owner))


def _is_gpu_index(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__ or "IndexShards" in type(index).__name__


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
