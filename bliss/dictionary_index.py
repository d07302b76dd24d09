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
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    import faiss

# Query batches of at least this many rows are scored with one BLAS matrix product.
# faiss 1.1x defaults to 128,000, which sends every realistic batch to its scalar scan:
# measured with faiss-cpu 1.15.1 on 2 cores, 64 queries x 100,000 x 512 took 752 ms
# that way and 88 ms through BLAS (1,850 entries: 4.7 ms and 1.6 ms). Single queries
# stay on the scan, which is faster for them.
BLAS_QUERY_THRESHOLD = 20
ADD_BATCH_ROWS = 65_536
EXACT_RESCORE_BYTES = 1 << 20
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
        return f"IVF{nlist},PQ{pq_m}x8"


def build_index(
    embeddings: np.ndarray,
    options: IndexOptions | None = None,
    *,
    on_progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> DictionaryIndex:
    """Index ``embeddings`` [t, D] (a memory map is fine: rows are added in batches).

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
    for start in range(0, rows, ADD_BATCH_ROWS):
        batch = np.ascontiguousarray(embeddings[start : start + ADD_BATCH_ROWS], dtype=np.float32)
        index.add(batch)
        if on_progress is not None:
            on_progress(len(batch))
    if options.kind is IndexKind.IVF:
        # Lets search() reconstruct the top-K vectors to report exact similarities.
        faiss.extract_index_ivf(index).make_direct_map()
    return DictionaryIndex(index, options.kind)


class DictionaryIndex:
    """A searchable dictionary: ids are dictionary positions 0..t-1."""

    def __init__(self, index: faiss.Index, kind: IndexKind) -> None:
        self.index = index
        self.kind = kind

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Eq. 7: the ``k`` most similar entries of each query, most similar first.

        Returns similarities [B, k] and ids int64 [B, k]. When the index keeps the exact
        vectors, the similarities are recomputed in float64 from them: faiss's float32
        scores, divided by small per-class sigmas, would cost the score digits it needs.
        """
        if not 1 <= k <= self.ntotal:
            raise InvalidInputError(
                f"K={k} must be between 1 and the dictionary size {self.ntotal}"
            )
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"query embeddings have shape {queries.shape}, expected [B, {self.dim}]"
            )
        similarities, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        if (ids < 0).any():
            raise InvalidInputError(
                f"the {self.kind.value} index found fewer than K={k} entries for some inputs: "
                "lower K or rebuild the index with a larger --nprobe"
            )
        if not self.kind.stores_exact_vectors:
            return similarities, ids
        return self._exact_similarities(queries, ids)

    def _exact_similarities(
        self, queries: np.ndarray, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        unique, inverse = np.unique(ids, return_inverse=True)
        vectors = self.index.reconstruct_batch(unique).astype(np.float64)
        positions = inverse.reshape(ids.shape)
        queries = queries.astype(np.float64)
        similarities = np.empty(ids.shape, dtype=np.float64)
        # Row blocks keep the gathered [rows, k, D] float64 vectors small (about 1 MiB).
        rows = max(1, EXACT_RESCORE_BYTES // (8 * ids.shape[1] * self.dim))
        for start in range(0, len(ids), rows):
            block = slice(start, start + rows)
            similarities[block] = np.einsum("bd,bkd->bk", queries[block], vectors[positions[block]])
        order = np.argsort(-similarities, axis=1, kind="stable")
        return np.take_along_axis(similarities, order, 1), np.take_along_axis(ids, order, 1)

    def to_gpus(self) -> DictionaryIndex:
        """A copy on every visible GPU (sharded across them), or self when there are none.

        HNSW has no GPU implementation and stays on the CPU.
        """
        faiss = _faiss()

        if self.kind is IndexKind.HNSW or not hasattr(faiss, "index_cpu_to_all_gpus"):
            return self
        if faiss.get_num_gpus() == 0:
            return self
        cloner = faiss.GpuMultipleClonerOptions()
        cloner.shard = True
        return DictionaryIndex(faiss.index_cpu_to_all_gpus(self.index, co=cloner), self.kind)

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
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if memory_map else 0
        return cls(faiss.read_index(str(path), flags), kind)


@functools.cache
def _faiss() -> ModuleType:
    """The faiss module, configured once (imported lazily: it is not needed to start)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = BLAS_QUERY_THRESHOLD
    return faiss


def _check_matrix(embeddings: np.ndarray) -> tuple[int, int]:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise InvalidInputError(
            f"dictionary embeddings must be a non-empty [t, D] matrix, got {embeddings.shape}"
        )
    return int(embeddings.shape[0]), int(embeddings.shape[1])


def _training_sample(embeddings: np.ndarray, index: faiss.Index, seed: int) -> np.ndarray:
    faiss = _faiss()

    ivf = faiss.extract_index_ivf(index)
    wanted = max(ivf.nlist * TRAINING_POINTS_PER_CENTROID, 256 * 39)
    rows = embeddings.shape[0]
    if rows <= wanted:
        return np.ascontiguousarray(embeddings, dtype=np.float32)
    picked = np.sort(np.random.default_rng(seed).choice(rows, size=wanted, replace=False))
    return np.ascontiguousarray(embeddings[picked], dtype=np.float32)


def _apply_search_options(index: faiss.Index, options: IndexOptions) -> None:
    faiss = _faiss()

    if options.kind in (IndexKind.IVF, IndexKind.IVFPQ):
        faiss.extract_index_ivf(index).nprobe = options.nprobe
    elif options.kind is IndexKind.HNSW:
        index.hnsw.efSearch = options.ef_search


def _is_gpu_index(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__ or "IndexShards" in type(index).__name__


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
