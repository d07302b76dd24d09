"""Search a dictionary index on every visible GPU (faiss-gpu), or keep it on the CPU.

Flat, IVF and IVF-PQ indexes are copied to the GPUs, split across them (``shard``, so
a dictionary larger than one GPU fits) or copied whole to each (replicas: more queries
per second). The CPU index stays beside the copy: faiss's GPU shards and GPU IVF
cannot return stored vectors by id, and the exact float64 rescoring of
:class:`~bliss.dictionary_index.DictionaryIndex` needs the original float32 vectors
even when the GPUs hold float16 ones. HNSW has no GPU implementation.

Without faiss GPU support (the faiss-cpu wheel) or without a visible GPU the CPU index
is returned unchanged, and a log line says why.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

# faiss's GPU k-selection handles at most this many neighbours (GPU_MAX_SELECTION_K).
GPU_MAX_K = 2048


@dataclass(frozen=True)
class GpuOptions:
    """How an index is laid out on the GPUs."""

    # Flat: vectors stored in float16 (half the GPU memory); IVF: inverted lists in
    # float16 (converted to faiss's IVF scalar quantizer); IVF-PQ: float16 lookup tables.
    float16: bool = False
    # Split the entries across the GPUs; False puts a whole copy on each GPU.
    shard: bool = True


class GpuSearchIndex:
    """Searches on the GPUs; reads stored vectors from the CPU index it was copied from.

    Stands in for a faiss index inside DictionaryIndex (``d``, ``ntotal``, ``search``,
    ``reconstruct_batch``).
    """

    def __init__(self, gpu_index: faiss.Index, cpu_index: faiss.Index, gpus: int) -> None:
        self.gpu_index = gpu_index
        self.cpu_index = cpu_index
        self.gpus = gpus
        # faiss's GPU resources may be used from one thread at a time.
        self._lock = threading.Lock()

    @property
    def d(self) -> int:
        return int(self.cpu_index.d)

    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > GPU_MAX_K:
            return self.cpu_index.search(queries, k)
        with self._lock:
            return self.gpu_index.search(queries, k)

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return self.cpu_index.reconstruct_batch(ids)


def gpu_count() -> int:
    """GPUs that faiss can use: 0 with the faiss-cpu wheel or when none is visible."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def place_on_gpus(
    index: faiss.Index, options: GpuOptions | None = None
) -> faiss.Index | GpuSearchIndex:
    """``index`` searched on every visible GPU, or ``index`` itself when it must stay."""
    options = options or GpuOptions()
    reason = _cpu_only_reason(index)
    if reason is not None:
        logger.info("FAISS index (%s) stays on the CPU: %s", _describe(index), reason)
        return index
    gpus = gpu_count()
    try:
        gpu_index = _clone_to_gpus(index, options)
    except RuntimeError as error:  # faiss turns its C++ exceptions into RuntimeError
        logger.warning(
            "FAISS index (%s) stays on the CPU: copying it to the GPUs failed (%s)",
            _describe(index),
            str(error).strip().splitlines()[0],
        )
        return index
    logger.info(
        "FAISS index (%s) searched on %d GPU(s), %s, %s",
        _describe(index),
        gpus,
        "sharded" if options.shard else "replicated",
        "float16" if options.float16 else "float32",
    )
    return GpuSearchIndex(gpu_index, index, gpus)


def ivf_flat_to_float16(index: faiss.Index) -> faiss.Index:
    """The same inverted lists, ids and coarse quantizer, with float16 vectors.

    Copies the lists rather than adding the vectors again, which would assign every
    vector to its list anew: a search over all the centroids per vector.
    """
    import faiss
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.extract_index_ivf(index)
    half = faiss.IndexIVFScalarQuantizer(
        ivf.quantizer, ivf.d, ivf.nlist, faiss.ScalarQuantizer.QT_fp16, ivf.metric_type, False
    )
    half.is_trained = True  # float16 codes need no training; the quantizer is trained
    half.nprobe = ivf.nprobe
    invlists = half.invlists
    assert invlists is not None, "an IndexIVF constructed as above owns its inverted lists"
    for list_no in range(ivf.nlist):
        ids, codes = get_invlist(ivf.invlists, list_no)
        if len(ids) == 0:
            continue
        vectors = np.ascontiguousarray(codes).view(np.float32).astype(np.float16)
        invlists.add_entries(
            list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(vectors.view(np.uint8))
        )
    half.ntotal = ivf.ntotal
    return half


def _cpu_only_reason(index: faiss.Index) -> str | None:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return (
            "this faiss has no GPU support (the faiss-cpu wheel); install faiss-gpu as the "
            "README says under 'Large dictionaries and GPUs'"
        )
    if faiss.get_num_gpus() == 0:
        return "faiss sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    if isinstance(index, faiss.IndexHNSW):
        return "HNSW has no GPU implementation"
    return None


def _clone_to_gpus(index: faiss.Index, options: GpuOptions) -> faiss.Index:
    import faiss

    cloner = faiss.GpuMultipleClonerOptions()
    cloner.shard = options.shard
    # useFloat16 is float16 storage for flat indexes and float16 lookup tables for IVF-PQ;
    # it leaves IVF-Flat lists in float32, hence their conversion. The coarse quantizer
    # stays float32: it is small, and it decides which lists a query searches.
    cloner.useFloat16 = options.float16
    source = index
    if options.float16 and isinstance(index, faiss.IndexIVFFlat):
        source = ivf_flat_to_float16(index)
    return faiss.index_cpu_to_all_gpus(source, co=cloner)


def _describe(index: faiss.Index) -> str:
    return f"{type(index).__name__}, {index.ntotal:,} x {index.d}"
