"""The AnomalyScorer service: bytes -> request -> validation and budgets -> (decode,
encode) -> Scorer.score -> finite outputs only.

The service takes raw request bytes (:meth:`AnomalyScorerService.method_handlers`) and
parses them itself, so a malformed message is answered INVALID_ARGUMENT instead of
gRPC's UNKNOWN with a traceback, is counted in the metrics, and nothing is parsed before
the token check (an interceptor) has passed. CPU-heavy stages run off the event loop:
validation, FAISS search, gather and scoring on the scoring pool, a micro-batch of rows
(``--micro-batch-items``) per turn; image header checks and decoding on the decode pool,
an image per turn; encoding on the micro-batcher's thread. Concurrent requests take
turns on each (:mod:`bliss.server.fair_scheduler`), so a huge batch cannot starve small
ones. Expected failures are BlissErrors turned into a precise status with field
violations; anything else is logged with a traceback and answered INTERNAL with a
reference to that log line.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, cast

import grpc
import numpy as np

from bliss import tracing
from bliss.errors import BlissError, InvalidInputError, StoreError
from bliss.server.error_details import (
    describe_item,
    error_status,
    item_error,
    shorten,
    with_prefix,
)
from bliss.server.fair_scheduler import FairScheduler, Lane
from bliss.server.image_decoding import ImageLimits, declared_pixels, preprocessed_image
from bliss.server.index_info import index_info
from bliss.server.index_registry import IndexRegistry, ServedIndex
from bliss.server.metrics import ServerMetrics
from bliss.server.micro_batches import merge_parts, row_slices, score_rows
from bliss.server.request_limits import ResponseShape, check_response_size
from bliss.server.scoring_requests import (
    ParsedItems,
    ScoringOptions,
    parse_items,
    parse_message,
    parse_options,
)
from bliss.server.settings import ServerSettings
from bliss.server.status_codes import (
    ImagesUnavailableError,
    status_code_for,
)
from bliss.server.tracing import rpc_span
from bliss.store.database import redact_url
from bliss.v1 import scorer_pb2

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SCORER_SERVICE = scorer_pb2.DESCRIPTOR.services_by_name["AnomalyScorer"].full_name
# Request messages of one stream scored concurrently (responses still go out in order).
STREAM_WINDOW = 4


class AnomalyScorerService:
    def __init__(
        self, registry: IndexRegistry, settings: ServerSettings, metrics: ServerMetrics
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._limits = ImageLimits(
            settings.max_image_bytes, settings.max_image_pixels, settings.max_request_pixels
        )
        self._scoring_pool = ThreadPoolExecutor(
            settings.scoring_threads, thread_name_prefix="bliss-score"
        )
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="bliss-decode"
        )
        self._scoring = FairScheduler(self._scoring_pool, settings.scoring_threads)
        self._decoding = FairScheduler(self._decode_pool, settings.decode_threads)
        self._store_url = redact_url(settings.resolved_store_url)

    def close(self) -> None:
        self._scoring_pool.shutdown(wait=True, cancel_futures=True)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def method_handlers(self) -> grpc.GenericRpcHandler:
        """bliss.v1.AnomalyScorer with raw-bytes requests (parsed by the methods below)."""
        return grpc.method_handlers_generic_handler(
            SCORER_SERVICE,
            {
                "Score": grpc.unary_unary_rpc_method_handler(
                    self.Score, response_serializer=scorer_pb2.ScoreResponse.SerializeToString
                ),
                "ScoreStream": grpc.stream_stream_rpc_method_handler(
                    self.ScoreStream,
                    response_serializer=scorer_pb2.ScoreResponse.SerializeToString,
                ),
                "GetIndexInfo": grpc.unary_unary_rpc_method_handler(
                    self.GetIndexInfo, response_serializer=scorer_pb2.IndexInfo.SerializeToString
                ),
                "ListIndexes": grpc.unary_unary_rpc_method_handler(
                    self.ListIndexes,
                    response_serializer=scorer_pb2.ListIndexesResponse.SerializeToString,
                ),
            },
        )

    # ------------------------------------------------------------------ RPCs

    async def Score(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ScoreResponse:
        async with self.serving(context, "Score"):
            return await self.score(parse_message(raw, scorer_pb2.ScoreRequest))

    async def ScoreStream(  # noqa: N802 (gRPC method name)
        self, raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scorer_pb2.ScoreResponse]:
        # A reader task keeps taking request messages while earlier ones are scored, so a
        # client that waits for each response before sending the next one cannot deadlock.
        window: asyncio.Queue[asyncio.Task | BaseException | None] = asyncio.Queue(STREAM_WINDOW)
        reader = asyncio.ensure_future(self._read_stream(raw_requests, window, context))
        position = 0
        try:
            async with self._status_on_error(context, "ScoreStream"):
                while (task := await window.get()) is not None:
                    if isinstance(task, BaseException):
                        raise task
                    try:
                        response = await task
                    except BlissError as error:
                        raise with_prefix(error, f"stream message {position}") from None
                    yield response
                    position += 1
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()

    async def GetIndexInfo(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.IndexInfo:
        async with self._status_on_error(context, "GetIndexInfo"):
            with rpc_span("GetIndexInfo", context), self._measured("GetIndexInfo", context):
                request = parse_message(raw, scorer_pb2.GetIndexInfoRequest)
                return index_info(self._registry.resolve(request.index))

    async def ListIndexes(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ListIndexesResponse:
        async with self._status_on_error(context, "ListIndexes"):
            with rpc_span("ListIndexes", context), self._measured("ListIndexes", context):
                parse_message(raw, scorer_pb2.ListIndexesRequest)
                served = self._registry.served_indexes()
                return scorer_pb2.ListIndexesResponse(indexes=[index_info(s) for s in served])

    # ------------------------------------------------------------------ shared by front ends

    @asynccontextmanager
    async def serving(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        """One call of ``method``, of this or another front end (the Open Inference
        Protocol): counted in the metrics, its errors answered as statuses."""
        async with self._status_on_error(context, method):
            with rpc_span(method, context), self._measured(method, context):
                yield

    async def score(self, request: scorer_pb2.ScoreRequest) -> scorer_pb2.ScoreResponse:
        """Validate, budget and score one request: the path every front end takes."""
        self._metrics.inflight.inc()
        try:
            with (
                self._registry.lease(request.options.index) as served,
                self._scoring.lane() as lane,
            ):
                parsed, options, response = await self._scoring.run(
                    lane, tracing.carried(self._parse_and_score_small), request, served
                )
                tracing.annotate(
                    {
                        "bliss.index": served.version.name,
                        "bliss.version": served.version.version,
                        "bliss.items": len(parsed.ids),
                        "bliss.k": options.effective_k(served.scorer.defaults.k),
                        "bliss.mode": options.mode.value,
                    }
                )
                if response is None:
                    if parsed.image_positions:
                        rows = await self._encode_images(served, parsed)
                        parsed.embeddings[parsed.image_positions] = rows
                    response = await self._score_micro_batches(lane, served, parsed, options)
        finally:
            self._metrics.inflight.dec()
        self._metrics.batch_items.labels(served.version.name).observe(len(parsed.ids))
        self._metrics.items.labels(served.label).inc(len(parsed.ids))
        return response

    def _parse_and_score_small(
        self, request: scorer_pb2.ScoreRequest, served: ServedIndex
    ) -> tuple[ParsedItems, ScoringOptions, scorer_pb2.ScoreResponse | None]:
        """Validate the whole request and its budget; score it in this same turn when it
        holds no images and fits one micro-batch."""
        settings = self._settings
        options = parse_options(request.options, served.scorer, settings.max_k)
        parsed = parse_items(
            request.items, served.scorer.dim, served.label, settings.max_batch_items
        )
        shape = ResponseShape(
            parsed.ids,
            options.effective_k(served.scorer.defaults.k),
            options.top_entries,
            options.class_scores,
        )
        check_response_size(
            shape, served.scorer, served.entry_text_bound, settings.max_message_bytes
        )
        if parsed.image_positions and served.images is None:
            first = parsed.image_positions[0]
            raise ImagesUnavailableError(
                f"{describe_item(first, parsed.ids[first])} is an image, but index "
                f"{served.label} cannot encode images: {served.images_unavailable_reason}"
            )
        micro_batch = settings.micro_batch_items
        if parsed.image_positions or (micro_batch and len(parsed.ids) > micro_batch):
            return parsed, options, None
        whole = slice(0, len(parsed.ids))
        part = score_rows(served, parsed, options, whole, self._store_url)
        return parsed, options, merge_parts([part], parsed.ids, served.label)

    async def _score_micro_batches(
        self, lane: Lane, served: ServedIndex, parsed: ParsedItems, options: ScoringOptions
    ) -> scorer_pb2.ScoreResponse:
        """Score the rows a micro-batch per turn of the request's lane, then merge."""
        parts = await asyncio.gather(
            *(
                self._scoring.run(
                    lane,
                    tracing.carried(score_rows),
                    served,
                    parsed,
                    options,
                    rows,
                    self._store_url,
                )
                for rows in row_slices(len(parsed.ids), self._settings.micro_batch_items)
            )
        )
        if len(parts) == 1:
            return merge_parts(parts, parsed.ids, served.label)
        # Merging copies every result: a few ms for 4,096 items, so it takes its turn too.
        return await self._scoring.run(lane, merge_parts, parts, parsed.ids, served.label)

    def _check_image_pixels(self, parsed: ParsedItems) -> None:
        """Header checks of every image, and the request's pixel budget, before decoding."""
        total = 0
        for position, data in zip(parsed.image_positions, parsed.images, strict=True):
            item_id = parsed.ids[position]
            try:
                total += declared_pixels(data, self._limits)
            except InvalidInputError as error:
                raise item_error(position, item_id, "image", str(error)) from None
            if total > self._limits.max_request_pixels:
                raise item_error(
                    position,
                    item_id,
                    "image",
                    f"the request's images declare {total:,} pixels up to this one, over the "
                    f"server's limit of {self._limits.max_request_pixels:,} per request "
                    "(--max-request-pixels): send fewer or smaller images per request",
                )

    async def _encode_images(self, served: ServedIndex, parsed: ParsedItems) -> np.ndarray:
        assert served.images is not None  # checked while parsing
        preprocess = served.images.encoder.preprocess
        # One image per task, in turns with other requests' images.
        with (
            tracing.span("decode", {"bliss.images": len(parsed.images)}),
            self._decoding.lane() as lane,
        ):
            await self._decoding.run(lane, self._check_image_pixels, parsed)
            decoded = await asyncio.gather(
                *(
                    self._decoding.run(lane, preprocessed_image, data, self._limits, preprocess)
                    for data in parsed.images
                ),
                return_exceptions=True,
            )
        # Report the first bad image in request order, whichever failed first in time.
        for position, outcome in zip(parsed.image_positions, decoded, strict=True):
            if isinstance(outcome, InvalidInputError):
                raise item_error(position, parsed.ids[position], "image", str(outcome)) from None
            if isinstance(outcome, BaseException):
                raise outcome
        # Every outcome is a tensor: the loop above raised on the first exception.
        return await served.images.batcher.encode(cast("list[torch.Tensor]", decoded))

    async def _read_stream(
        self,
        raw_requests: AsyncIterator[bytes],
        window: asyncio.Queue[asyncio.Task | BaseException | None],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            async for raw in raw_requests:
                await window.put(asyncio.ensure_future(self._score_stream_message(raw, context)))
        except Exception as error:
            await window.put(error)
            return
        await window.put(None)

    async def _score_stream_message(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ScoreResponse:
        # One span per message, as the metrics count them: a stream may last for hours.
        with rpc_span("ScoreStream", context), self._measured("ScoreStream", context):
            return await self.score(parse_message(raw, scorer_pb2.ScoreRequest))

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
            message = self._public_message(error, method, context)
            status = error_status(code, message, error)
            # Request-controlled text in the message is already shortened: one short line.
            logger.log(
                logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO,
                "%s from %s failed: %s: %s",
                method,
                context.peer(),
                code.name,
                status.details,
                extra={"method": method, "code": code.name, "peer": context.peer()},
            )
            await context.abort(status.code, status.details, status.trailing_metadata)
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

    def _public_message(
        self, error: BlissError, method: str, context: grpc.aio.ServicerContext
    ) -> str:
        """The error's message; a neutral one for store errors, whose text names the
        store's URL and hosts (the detail goes to the log)."""
        if not isinstance(error, StoreError):
            return str(error)
        reference = secrets.token_hex(4)
        logger.warning(
            "%s from %s failed (reference %s): %s",
            method,
            context.peer(),
            reference,
            shorten(str(error), 2000),
        )
        return (
            f"the statistics store is unavailable; retry later (reference {reference}: the "
            "server log has the details)"
        )


def _cancellation_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
