"""Turn a stored index version into a :class:`~bliss.scorer.Scorer`.

The FAISS file is memory-mapped. The statistics (N x t pairs of float64) and the entry
texts are held in memory when they fit the memory budget, else each batch gathers just
the rows it needs from the store; both paths return the same numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bliss.dictionary_index import DictionaryIndex, IndexKind
from bliss.errors import InvalidInputError
from bliss.scorer import (
    EntryStatisticsSource,
    EntryTextSource,
    InMemoryEntryStatistics,
    InMemoryEntryTexts,
    NormalClasses,
    Scorer,
    ScoringDefaults,
)
from bliss.store import Store, VersionRecord

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
    verify_checksum: bool = True,
) -> Scorer:
    """Load a fully written ``version`` (FAISS file, classes, entries, statistics)."""
    index = DictionaryIndex.load(
        data_dir / version.faiss_path,
        IndexKind(version.faiss_kind),
        expected_checksum=version.faiss_checksum if verify_checksum else None,
    )
    if use_gpu:
        index = index.to_gpus()
    records = store.load_classes(version.id)
    classes = NormalClasses(
        names=tuple(r.name for r in records),
        label_embeddings=np.stack([r.label_embedding for r in records]).astype(np.float32),
        label_mean=np.array([r.label_mean for r in records], dtype=np.float64),
        label_std=np.array([r.label_std for r in records], dtype=np.float64),
    )
    statistics, texts = _statistics_sources(store, version, len(records), memory_budget_bytes)
    return Scorer(
        index=index,
        classes=classes,
        statistics=statistics,
        texts=texts,
        defaults=ScoringDefaults(k=version.default_k, lam=version.default_lambda, eps=version.eps),
        label=version.label,
        calibration=store.load_calibration(version.id),
    )


def _statistics_sources(
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


def image_encoder_for(version: VersionRecord, device: str | None, batch_size: int) -> ClipEncoder:
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
    return ClipEncoder.load(spec, device=device, batch_size=batch_size)
