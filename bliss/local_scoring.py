"""Scoring without a server: ``bliss score --local`` and notebooks.

Loads the active version of an index from the store and scores embeddings (an .npy
file) and/or image files batch by batch, writing one JSON line per input in input order:
the same code path and output format as the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from bliss.embedding_bundle import load_embeddings_file
from bliss.errors import InvalidInputError
from bliss.scored_item import scored_items, write_json_lines
from bliss.scoring import ScoringMode
from bliss.settings import StoreSettings
from bliss.store import Store, VersionRecord
from bliss.version_loader import DEFAULT_MEMORY_BUDGET_BYTES, image_encoder_for, load_scorer


@dataclass(frozen=True)
class LocalScoringRequest:
    index: str
    embeddings: Path | None = None
    images: tuple[Path, ...] = ()
    mode: str = ScoringMode.BLISS.value
    k: int | None = None
    lam: float | None = None
    class_scores: bool = False
    batch_size: int = 256
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    device: str | None = None


def score_locally(settings: StoreSettings, request: LocalScoringRequest, stream: IO[str]) -> int:
    """Score every input of ``request`` against the active version; returns the count."""
    mode = ScoringMode.parse(request.mode)
    if request.batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    written = 0
    with Store.open(settings.resolved_store_url) as store:
        version = store.get_version(request.index)
        scorer = load_scorer(
            store, version, settings.data_dir, memory_budget_bytes=request.memory_budget_bytes
        )
        for ids, embeddings in _input_batches(request, version):
            batch = scorer.score(embeddings, mode=mode, k=request.k, lam=request.lam)
            items = scored_items(batch, scorer, ids, class_scores=request.class_scores)
            write_json_lines(items, stream)
            written += len(items)
    return written


def _input_batches(
    request: LocalScoringRequest, version: VersionRecord
) -> Iterator[tuple[list[str], np.ndarray]]:
    size = request.batch_size
    if request.embeddings is not None:
        embeddings = load_embeddings_file(request.embeddings)
        for start in range(0, len(embeddings), size):
            block = np.asarray(embeddings[start : start + size])
            ids = [f"{request.embeddings.name}#{i}" for i in range(start, start + len(block))]
            yield ids, block
    if request.images:
        encoder = image_encoder_for(version, request.device, size)
        for start in range(0, len(request.images), size):
            paths = request.images[start : start + size]
            yield [str(p) for p in paths], encoder.encode_images(list(paths))
