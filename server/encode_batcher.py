"""Dynamic micro-batching of image encoding across concurrent requests.

Requests put preprocessed images in a queue of their own; one worker takes up to
``max_batch`` of them at a time, waiting at most ``max_delay_s`` after the first for more
(Triton's dynamic batcher), and encodes each micro-batch in one model call on its own
thread. While a batch is encoding, newly arrived images queue up, so under load batches
fill by themselves. A batch takes one image from each waiting request in turn, so a
request of 4,096 images does not hold back a request of 4 that arrives after it (its
images go into the next batch). Images of a cancelled request (deadline, client gone) are
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bliss import tracing
from bliss.server.status_codes import EncodingFailedError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Pending:
    pixels: torch.Tensor
    result: asyncio.Future[np.ndarray]


class EncodeBatcher:
    """Encodes [3, H, W] tensors with ``encode`` ([B, 3, H, W] -> float32 [B, D])."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor], np.ndarray],
        *,
        name: str,
        max_batch: int,
        max_delay_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.name = name
        self._encode = encode
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._on_batch = on_batch
        # One queue per encode() call; the deque is the order in which they take turns.
        self._turns: deque[deque[_Pending]] = deque()
        self._arrived = asyncio.Event()
        # One thread: the model runs one micro-batch at a time (one GPU stream, or torch's
        # own intra-op threads on the CPU).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"bliss-encode-{name}")
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def encode(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """Embeddings float32 [len(pixels), D] of the given images, in order."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(p, loop.create_future()) for p in pixels]
        queue = deque(pending)
        self._turns.append(queue)
        self._arrived.set()
        # The request's wait for its images' micro-batches (shared with other requests).
        with tracing.span("encode", {"bliss.images": len(pixels), "bliss.encoder": self.name}):
            try:
                rows = await asyncio.gather(*(item.result for item in pending))
            finally:
                for item in pending:
                    item.result.cancel()  # no-op for finished ones
                if queue:  # a failed or cancelled request: its images are not encoded
                    queue.clear()
                    self._turns.remove(queue)
        return np.stack(rows)

    async def close(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        for queue in self._turns:
            for item in queue:
                item.result.cancel()
        self._turns.clear()
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            live = [item for item in batch if not item.result.done()]
            if not live:
                continue
            self._on_batch(len(live))
            try:
                embeddings = await loop.run_in_executor(
                    self._executor, self._encode_stacked, [item.pixels for item in live]
                )
            except asyncio.CancelledError:
                for item in live:
                    item.result.cancel()
                raise
            except Exception:
                reference = secrets.token_hex(4)
                logger.exception(
                    "encoder %s failed on a micro-batch of %d (reference %s)",
                    self.name,
                    len(live),
                    reference,
                )
                # The exception's text may name the server's files or devices: log only.
                failure = EncodingFailedError(
                    f"the image encoder failed on a micro-batch of {len(live)} images "
                    f"(reference {reference}: the server log has the traceback)"
                )
                for item in live:
                    if not item.result.done():
                        item.result.set_exception(failure)
                continue
            for item, row in zip(live, embeddings, strict=True):
                if not item.result.done():
                    item.result.set_result(row)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        while not self._turns:
            self._arrived.clear()
            await self._arrived.wait()
        batch = self._take(self._max_batch)
        deadline = loop.time() + self._max_delay_s
        while len(batch) < self._max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if not self._turns:
                self._arrived.clear()
                waiter = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait({waiter}, timeout=remaining)
                waiter.cancel()
                if not self._turns:
                    break
            batch += self._take(self._max_batch - len(batch))
        return batch

    def _take(self, count: int) -> list[_Pending]:
        """Up to ``count`` images, one from each waiting request in turn."""
        batch: list[_Pending] = []
        while len(batch) < count and self._turns:
            queue = self._turns.popleft()
            batch.append(queue.popleft())
            if queue:
                self._turns.append(queue)
        return batch

    def _encode_stacked(self, pixels: list[torch.Tensor]) -> np.ndarray:
        import torch

        return self._encode(torch.stack(pixels))
