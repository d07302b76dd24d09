"""``bliss score --server``: the inputs and output of ``bliss score --local``, scored remotely.

Batches go out as unary calls, a few at a time (so several servers share the work and
a call that fails UNAVAILABLE is retried on another one); their lines are written in
input order as the calls complete.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bliss.client.async_client import AsyncBlissClient
from bliss.client.messages import Batch
from bliss.embedding_bundle import load_embeddings_file
from bliss.errors import InvalidInputError
from bliss.scored_item import ScoredItem, write_json_lines


@dataclass(frozen=True)
class RemoteScoringRequest:
    index: str = ""
    embeddings: Path | None = None
    images: tuple[Path, ...] = ()
    mode: str = "bliss"
    k: int | None = None
    lam: float | None = None
    class_scores: bool = False
    batch_size: int = 256
    concurrency: int = 4


async def score_remotely(
    client: AsyncBlissClient, request: RemoteScoringRequest, stream: IO[str]
) -> int:
    """Score every input of ``request``; writes one JSON line each, returns the count."""
    if request.batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    if request.concurrency < 1:
        raise InvalidInputError("--concurrency must be at least 1")
    pending: deque[asyncio.Task[list[ScoredItem]]] = deque()
    written = 0
    try:
        for batch in _input_batches(request):
            pending.append(asyncio.ensure_future(_score(client, request, batch)))
            if len(pending) >= request.concurrency:
                written += _write(await pending.popleft(), stream)
        while pending:
            written += _write(await pending.popleft(), stream)
    finally:
        for task in pending:
            task.cancel()
    return written


async def _score(
    client: AsyncBlissClient, request: RemoteScoringRequest, batch: Batch
) -> list[ScoredItem]:
    return await client.score(
        embeddings=batch.embeddings,
        images=batch.images,
        ids=batch.ids,
        index=request.index,
        mode=request.mode,
        k=request.k,
        lam=request.lam,
        class_scores=request.class_scores,
        top_entries=True,
    )


def _write(items: list[ScoredItem], stream: IO[str]) -> int:
    write_json_lines(items, stream)
    return len(items)


def _input_batches(request: RemoteScoringRequest) -> Iterator[Batch]:
    """The same ids and order as ``bliss score --local``: embeddings, then images."""
    size = request.batch_size
    if request.embeddings is not None:
        embeddings = load_embeddings_file(request.embeddings)
        name = request.embeddings.name
        for start in range(0, len(embeddings), size):
            block = embeddings[start : start + size]
            ids = [f"{name}#{i}" for i in range(start, start + len(block))]
            yield Batch(embeddings=block, ids=ids)
    for start in range(0, len(request.images), size):
        paths = request.images[start : start + size]
        yield Batch(images=paths, ids=[str(path) for path in paths])
