"""Turn a stored index version into a :class:`~bliss.scorer.Scorer`.

The FAISS file and the version's serving artifacts (entry texts, table-mode statistics,
exact vectors of IVF-PQ) are memory-mapped: loading reads the manifest and checks file
sizes, not every byte (``verify=True`` hashes everything, as activation and ``bliss
index verify`` do). Moments-mode versions compute eq. 8 for the hits from the classes'
moments. Versions built before serving artifacts existed read their statistics and
texts from the store: into memory under the memory budget, else per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bliss.dictionary_index import DictionaryIndex, IndexKind
from bliss.errors import InvalidInputError
from bliss.gpu_index import GpuOptions
from bliss.scorer import (
    DictionarySearch,
    EntryStatisticsSource,
    EntryTextSource,
    InMemoryEntryStatistics,
    InMemoryEntryTexts,
    MomentsEntryStatistics,
    NormalClasses,
    Scorer,
    ScoringDefaults,
)
from bliss.serving_artifacts import (
    MappedEntryStatistics,
    MappedEntryTexts,
    artifacts_directory,
    mapped_vectors,
    read_manifest,
    verify_artifacts,
)
from bliss.store import ClassRecord, StatisticsMode, Store, VersionRecord

if TYPE_CHECKING:
    from bliss.encoders import ClipEncoder

logger = logging.getLogger(__name__)

# The model name of versions built from embeddings of an unnamed model: no images.
PRECOMPUTED_MODEL = "precomputed"
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3
# Two float64 statistics per (class, entry), plus a rough allowance per entry text.
_BYTES_PER_STATISTIC = 16
_BYTES_PER_TEXT = 96


class StoreEntryStatistics:
    """Gathers each batch's statistics from the store: one query per batch."""

    source = "store"

    def __init__(self, store: Store, version_id: int, n_classes: int) -> None:
        self.store = store
        self.version_id = version_id
        self.n_classes = n_classes

    def gather(self, entry_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unique, inverse = np.unique(entry_ids, return_inverse=True)
        mean, std = self.store.entry_statistics(self.version_id, unique, self.n_classes)
        positions = inverse.reshape(entry_ids.shape)
        return np.moveaxis(mean[:, positions], 0, 1), np.moveaxis(std[:, positions], 0, 1)


class StoreEntryTexts:
    def __init__(self, store: Store, version_id: int) -> None:
        self.store = store
        self.version_id = version_id

    def texts(self, entry_ids: np.ndarray) -> list[str]:
        return self.store.entry_texts(self.version_id, entry_ids)


def memory_needed(version: VersionRecord, n_classes: int) -> int:
    """Bytes that holding this version's statistics and texts in memory takes."""
    return version.dictionary_size * (n_classes * _BYTES_PER_STATISTIC + _BYTES_PER_TEXT)


def load_scorer(
    store: Store,
    version: VersionRecord,
    data_dir: Path,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    use_gpu: bool = False,
    gpu_options: GpuOptions | None = None,
    verify: bool = False,
) -> Scorer:
    """Load a fully written ``version`` (FAISS file, classes, artifacts or store rows)."""
    if version.dictionary_store == "milvus":
        return _milvus_scorer(store, version)
    faiss_file = data_dir / version.faiss_path
    artifacts = None
    if version.artifacts_checksum is not None:
        artifacts = artifacts_directory(faiss_file)
        check = verify_artifacts if verify else read_manifest
        check(artifacts, faiss_file, version.artifacts_checksum)
    kind = IndexKind(version.faiss_kind)
    index = DictionaryIndex.load(
        faiss_file,
        kind,
        expected_checksum=version.faiss_checksum if verify and artifacts is None else None,
        exact_vectors=mapped_vectors(artifacts) if artifacts and kind is IndexKind.IVFPQ else None,
    )
    if use_gpu:
        index = index.to_gpus(gpu_options)
    records = store.load_classes(version.id)
    classes = _normal_classes(records)
    if artifacts is None:
        statistics, texts = _store_sources(store, version, len(records), memory_budget_bytes)
    else:
        texts = MappedEntryTexts(artifacts)
        statistics = (
            _moments_statistics(records, index.vectors_at)
            if version.statistics_mode is StatisticsMode.MOMENTS
            else MappedEntryStatistics(artifacts)
        )
    return _scorer(store, version, index, classes, statistics, texts)


def _milvus_scorer(store: Store, version: VersionRecord) -> Scorer:
    """A version whose dictionary is a Milvus collection: texts and vectors come with the
    hits; moments mode needs nothing else, table mode gathers from the store per batch."""
    from bliss.milvus_dictionary import MilvusDictionary, MilvusDictionaryOptions

    options = MilvusDictionaryOptions.from_json(version.dictionary_options or "{}")
    index = MilvusDictionary(options, version.embedding_dim, version.dictionary_size)
    records = store.load_classes(version.id)
    statistics: EntryStatisticsSource = (
        _moments_statistics(records, index.vectors_at)
        if version.statistics_mode is StatisticsMode.MOMENTS
        else StoreEntryStatistics(store, version.id, len(records))
    )
    return _scorer(store, version, index, _normal_classes(records), statistics, index)


def _scorer(
    store: Store,
    version: VersionRecord,
    index: DictionarySearch,
    classes: NormalClasses,
    statistics: EntryStatisticsSource,
    texts: EntryTextSource,
) -> Scorer:
    return Scorer(
        index=index,
        classes=classes,
        statistics=statistics,
        texts=texts,
        defaults=ScoringDefaults(k=version.default_k, lam=version.default_lambda, eps=version.eps),
        label=version.label,
        calibration=store.load_calibration(version.id),
    )


def _normal_classes(records: list[ClassRecord]) -> NormalClasses:
    return NormalClasses(
        names=tuple(r.name for r in records),
        label_embeddings=np.stack([r.label_embedding for r in records]).astype(np.float32),
        label_mean=np.array([r.label_mean for r in records], dtype=np.float64),
        label_std=np.array([r.label_std for r in records], dtype=np.float64),
    )


def _moments_statistics(
    records: list[ClassRecord], vectors_at: Callable[[np.ndarray], np.ndarray]
) -> MomentsEntryStatistics:
    return MomentsEntryStatistics(
        np.stack([r.moment_mean for r in records]),
        np.stack([r.moment_covariance for r in records]),
        vectors_at,
    )


def _store_sources(
    store: Store, version: VersionRecord, n_classes: int, budget: int
) -> tuple[EntryStatisticsSource, EntryTextSource]:
    needed = memory_needed(version, n_classes)
    if needed > budget:
        logger.info(
            "%s needs %.1f MiB for in-memory statistics, over the %.1f MiB budget: "
            "gathering from the store per batch",
            version.label,
            needed / 2**20,
            budget / 2**20,
        )
        return (
            StoreEntryStatistics(store, version.id, n_classes),
            StoreEntryTexts(store, version.id),
        )
    mean, std = store.all_entry_statistics(version.id, n_classes, version.dictionary_size)
    texts = list(store.iter_entry_texts(version.id))
    return InMemoryEntryStatistics(mean, std), InMemoryEntryTexts(texts)


def image_encoder_for(
    version: VersionRecord, device: str | None, batch_size: int, precision: str = "fp32"
) -> ClipEncoder:
    """The encoder that made ``version``'s embeddings, to encode images scored against it.

    Refuses versions of an unnamed model and local checkpoints whose file changed since
    the build (their sha256 is recorded).
    """
    from bliss.encoders import ClipEncoder, ModelSpec

    if version.model_name == PRECOMPUTED_MODEL:
        raise InvalidInputError(
            f"{version.label} was built from precomputed embeddings of an unnamed model, so "
            "images cannot be encoded for it: send embeddings instead, or rebuild the "
            "version with --model/--pretrained"
        )
    spec = ModelSpec(model_name=version.model_name, pretrained=version.model_weights or None)
    if version.model_checksum and spec.checksum() != version.model_checksum:
        raise InvalidInputError(
            f"the checkpoint {version.model_weights} differs from the one {version.label} was "
            "built with (sha256 mismatch): restore that file or rebuild the version"
        )
    return ClipEncoder.load(spec, device=device, batch_size=batch_size, precision=precision)
