"""The AnomalyScorer service: request -> validation -> (decode, encode) -> Scorer.score.

CPU-heavy stages run off the event loop: parsing, FAISS search, gather and scoring on
the scoring pool; image decoding on the decode pool; encoding on the micro-batcher's
thread. Expected failures are BlissErrors turned into a precise status; anything else is
logged with a traceback and answered INTERNAL with a reference to find that log line.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager

import grpc
import numpy as np

from bliss.errors import BlissError, InvalidInputError
from bliss.server.image_decoding import ImageLimits, preprocessed_image
from bliss.server.index_info import index_info
from bliss.server.index_registry import IndexRegistry, ServedIndex
from bliss.server.metrics import ServerMetrics
from bliss.server.scoring_requests import (
    ParsedItems,
    ScoringOptions,
    build_response,
    describe_item,
    parse_items,
    parse_options,
)
from bliss.server.settings import ServerSettings
from bliss.server.status_codes import ImagesUnavailableError, status_code_for
from bliss.v1 import scorer_pb2, scorer_pb2_grpc

logger = logging.getLogger(__name__)

# Request messages of one stream scored concurrently (responses still go out in order).
STREAM_WINDOW = 4


class AnomalyScorerService(scorer_pb2_grpc.AnomalyScorerServicer):
    def __init__(
        self, registry: IndexRegistry, settings: ServerSettings, metrics: ServerMetrics
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self._scoring_pool = ThreadPoolExecutor(
            settings.scoring_threads, thread_name_prefix="bliss-score"
        )
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="bliss-decode"
        )

    def close(self) -> None:
        self._scoring_pool.shutdown(wait=True, cancel_futures=True)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ RPCs

    async def Score(  # noqa: N802 (gRPC method name)
        self, request: scorer_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ScoreResponse:
        async with self._status_on_error(context, "Score"):
            with self._measured("Score", context):
                return await self._score(request)

    async def ScoreStream(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[scorer_pb2.ScoreRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scorer_pb2.ScoreResponse]:
        # A reader task keeps taking request messages while earlier ones are scored, so a
        # client that waits for each response before sending the next one cannot deadlock.
        window: asyncio.Queue[asyncio.Task | BaseException | None] = asyncio.Queue(STREAM_WINDOW)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, window, context))
        position = 0
        try:
            async with self._status_on_error(context, "ScoreStream"):
                while (task := await window.get()) is not None:
                    if isinstance(task, BaseException):
                        raise task
                    try:
                        response = await task
                    except BlissError as error:
                        raise type(error)(f"stream message {position}: {error}") from None
                    yield response
                    position += 1
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()

    async def GetIndexInfo(  # noqa: N802 (gRPC method name)
        self, request: scorer_pb2.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.IndexInfo:
        async with self._status_on_error(context, "GetIndexInfo"):
            with self._measured("GetIndexInfo", context):
                return index_info(self._registry.resolve(request.index))

    async def ListIndexes(  # noqa: N802 (gRPC method name)
        self, request: scorer_pb2.ListIndexesRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ListIndexesResponse:
        async with self._status_on_error(context, "ListIndexes"):
            with self._measured("ListIndexes", context):
                served = self._registry.served_indexes()
                return scorer_pb2.ListIndexesResponse(indexes=[index_info(s) for s in served])

    # ------------------------------------------------------------------ scoring

    async def _score(self, request: scorer_pb2.ScoreRequest) -> scorer_pb2.ScoreResponse:
        loop = asyncio.get_running_loop()
        self._metrics.inflight.inc()
        try:
            with self._registry.lease(request.options.index) as served:
                parsed, options, response = await loop.run_in_executor(
                    self._scoring_pool, self._parse_and_score_embeddings, request, served
                )
                if response is None:
                    rows = await self._encode_images(served, parsed)
                    parsed.embeddings[parsed.image_positions] = rows
                    response = await loop.run_in_executor(
                        self._scoring_pool, self._score_parsed, served, parsed, options
                    )
        finally:
            self._metrics.inflight.dec()
        self._metrics.batch_items.labels(served.version.name).observe(len(parsed.ids))
        self._metrics.items.labels(served.label).inc(len(parsed.ids))
        return response

    def _parse_and_score_embeddings(
        self, request: scorer_pb2.ScoreRequest, served: ServedIndex
    ) -> tuple[ParsedItems, ScoringOptions, scorer_pb2.ScoreResponse | None]:
        """Validate the whole request; score it right away when it holds no images."""
        options = parse_options(request.options, served.scorer, served.label)
        parsed = parse_items(
            request.items, served.scorer.dim, served.label, self._settings.max_batch_items
        )
        if not parsed.image_positions:
            return parsed, options, self._score_parsed(served, parsed, options)
        if served.images is None:
            first = parsed.image_positions[0]
            raise ImagesUnavailableError(
                f"{describe_item(first, parsed.ids[first])} is an image, but index "
                f"{served.label} cannot encode images: {served.images_unavailable_reason}"
            )
        return parsed, options, None

    def _score_parsed(
        self, served: ServedIndex, parsed: ParsedItems, options: ScoringOptions
    ) -> scorer_pb2.ScoreResponse:
        batch = served.scorer.score(
            parsed.embeddings, mode=options.mode, k=options.k, lam=options.lam
        )
        return build_response(batch, served.scorer, parsed.ids, options)

    async def _encode_images(self, served: ServedIndex, parsed: ParsedItems) -> np.ndarray:
        assert served.images is not None  # checked while parsing
        loop = asyncio.get_running_loop()
        preprocess = served.images.encoder.preprocess
        decoded = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._decode_pool, preprocessed_image, data, self._limits, preprocess
                )
                for data in parsed.images
            ),
            return_exceptions=True,
        )
        # Report the first bad image in request order, whichever failed first in time.
        for position, outcome in zip(parsed.image_positions, decoded, strict=True):
            if isinstance(outcome, InvalidInputError):
                raise InvalidInputError(
                    f"{describe_item(position, parsed.ids[position])}: {outcome}"
                ) from None
            if isinstance(outcome, BaseException):
                raise outcome
        return await served.images.batcher.encode(decoded)

    async def _read_stream(
        self,
        requests: AsyncIterator[scorer_pb2.ScoreRequest],
        window: asyncio.Queue[asyncio.Task | BaseException | None],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            async for request in requests:
                await window.put(
                    asyncio.ensure_future(self._score_stream_message(request, context))
                )
        except Exception as error:
            await window.put(error)
            return
        await window.put(None)

    async def _score_stream_message(
        self, request: scorer_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ScoreResponse:
        with self._measured("ScoreStream", context):
            return await self._score(request)

    # ------------------------------------------------------------------ errors and metrics

    @contextmanager
    def _measured(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except BlissError as error:
            code = status_code_for(error)
            raise
        except asyncio.CancelledError:
            code = _cancellation_code(context)
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self._metrics.requests.labels(method, code.name).inc()
            if code is not grpc.StatusCode.OK:
                self._metrics.errors.labels(method, code.name).inc()
            self._metrics.latency.labels(method).observe(time.perf_counter() - started)

    @asynccontextmanager
    async def _status_on_error(
        self, context: grpc.aio.ServicerContext, method: str
    ) -> AsyncIterator[None]:
        try:
            yield
        except BlissError as error:
            code = status_code_for(error)
            logger.info(
                "%s from %s failed: %s: %s",
                method,
                context.peer(),
                code.name,
                error,
                extra={"method": method, "code": code.name, "peer": context.peer()},
            )
            await context.abort(code, str(error))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            reference = secrets.token_hex(4)
            logger.exception(
                "%s from %s failed unexpectedly (reference %s)",
                method,
                context.peer(),
                reference,
                extra={"method": method, "code": "INTERNAL", "reference": reference},
            )
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error (reference {reference}: the server log has the details)",
            )


def _cancellation_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
