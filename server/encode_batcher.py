"""Dynamic micro-batching of image encoding across concurrent requests.

Requests put preprocessed images on a queue; one worker takes up to ``max_batch`` of them
at a time, waiting at most ``max_delay_s`` after the first for more (Triton's dynamic
batcher), and encodes each micro-batch in one model call on its own thread. While a
batch is encoding, newly arrived images queue up, so under load batches fill by
themselves. Images of a cancelled request (deadline, client gone) are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        # One thread: the model runs one micro-batch at a time (one GPU stream, or torch's
        # own intra-op threads on the CPU).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"bliss-encode-{name}")
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def encode(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """Embeddings float32 [len(pixels), D] of the given images, in order."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(p, loop.create_future()) for p in pixels]
        for item in pending:
            self._queue.put_nowait(item)
        try:
            rows = await asyncio.gather(*(item.result for item in pending))
        finally:
            for item in pending:
                item.result.cancel()  # no-op for finished ones; skipped by the worker
        return np.stack(rows)

    async def close(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        while not self._queue.empty():
            self._queue.get_nowait().result.cancel()
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
        batch = [await self._queue.get()]
        deadline = loop.time() + self._max_delay_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            item = await self._get_within(remaining)
            if item is None:
                break
            batch.append(item)
        return batch

    async def _get_within(self, timeout_s: float) -> _Pending | None:
        # Not asyncio.wait_for: before Python 3.12 it can drop an item that arrives just as
        # the timeout fires, leaving that request waiting until its deadline.
        getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({getter}, timeout=timeout_s)
        if not getter.done():
            getter.cancel()
            await asyncio.wait({getter})
        return None if getter.cancelled() else getter.result()

    def _encode_stacked(self, pixels: list[torch.Tensor]) -> np.ndarray:
        import torch

        return self._encode(torch.stack(pixels))
