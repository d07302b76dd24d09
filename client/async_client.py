"""AsyncBlissClient: the asyncio Python client; the same calls as BlissClient, awaited.

async with AsyncBlissClient("scoring.internal:50051") as client:
    items = await client.score(embeddings=vectors, index="shapes")
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bliss.client.connection import (
    DEFAULT_MAX_MESSAGE_MIB,
    USE_CLIENT_DEFAULT,
    ChannelPlan,
    Timeout,
    TlsConfig,
    UseClientDefault,
)
from bliss.client.messages import (
    Batch,
    ImageInput,
    ScoringServiceError,
    score_request,
    scored_items,
)
from bliss.client.sync_client import DEFAULT_TIMEOUT_S
from bliss.index_version_info import IndexInfo
from bliss.scored_item import ScoredItem
from bliss.scoring import ScoringMode
from bliss.scoring_options import ScoringOptions
from bliss.v1 import scorer_pb2, scorer_pb2_grpc


class AsyncBlissClient:
    """The asyncio twin of :class:`~bliss.client.BlissClient` (same arguments).

    Create it inside the event loop that will use it.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        tls: TlsConfig | bool | None = None,
        token: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB,
    ) -> None:
        plan = ChannelPlan.create(
            servers, tls=tls, token=token, max_retries=max_retries, max_message_mib=max_message_mib
        )
        if plan.credentials is None:
            self._channel = grpc.aio.insecure_channel(plan.target, options=plan.options)
        else:
            self._channel = grpc.aio.secure_channel(
                plan.target, plan.credentials, options=plan.options
            )
        self._metadata = plan.metadata
        self._timeout_s = timeout_s
        self._scorer = scorer_pb2_grpc.AnomalyScorerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def score(
        self,
        *,
        embeddings: np.ndarray | Sequence[np.ndarray] | None = None,
        images: Sequence[ImageInput] | None = None,
        ids: Sequence[str] | None = None,
        index: str = "",
        mode: str = "bliss",
        k: int | None = None,
        lam: float | None = None,
        class_scores: bool = False,
        top_entries: bool = True,
        timeout_s: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[ScoredItem]:
        """Score embeddings [B, D] and/or images (bytes or file paths); one item each, in order."""
        options = ScoringOptions(
            index, ScoringMode.parse(mode), k, lam, class_scores, top_entries
        ).to_proto()
        request = score_request(Batch(embeddings, images, ids), options)
        return scored_items(await self._call(self._scorer.Score, request, timeout_s))

    async def score_stream(
        self,
        batches: Iterable[Batch] | AsyncIterable[Batch],
        *,
        index: str = "",
        mode: str = "bliss",
        k: int | None = None,
        lam: float | None = None,
        class_scores: bool = False,
        top_entries: bool = True,
        timeout_s: float | None = None,
    ) -> AsyncIterator[list[ScoredItem]]:
        """Score batches over one stream; yields each batch's items in order.

        ``timeout_s`` bounds the whole stream (default: none).
        """
        options = ScoringOptions(
            index, ScoringMode.parse(mode), k, lam, class_scores, top_entries
        ).to_proto()

        async def requests() -> AsyncIterator[scorer_pb2.ScoreRequest]:
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield score_request(batch, options)
            else:
                for batch in batches:
                    yield score_request(batch, options)

        call = self._scorer.ScoreStream(requests(), timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                yield scored_items(response)
        except grpc.RpcError as error:
            raise ScoringServiceError.from_rpc_error(error) from None
        finally:
            call.cancel()

    async def index_info(
        self, index: str = "", *, timeout_s: Timeout = USE_CLIENT_DEFAULT
    ) -> IndexInfo:
        request = scorer_pb2.GetIndexInfoRequest(index=index)
        return IndexInfo.from_proto(await self._call(self._scorer.GetIndexInfo, request, timeout_s))

    async def list_indexes(self, *, timeout_s: Timeout = USE_CLIENT_DEFAULT) -> list[IndexInfo]:
        request = scorer_pb2.ListIndexesRequest()
        response = await self._call(self._scorer.ListIndexes, request, timeout_s)
        return [IndexInfo.from_proto(info) for info in response.indexes]

    async def health(self, service: str = "", *, timeout_s: Timeout = USE_CLIENT_DEFAULT) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request, timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBlissClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable, request: Message, timeout_s: Timeout
    ) -> Any:
        timeout = self._timeout_s if isinstance(timeout_s, UseClientDefault) else timeout_s
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ScoringServiceError.from_rpc_error(error) from None
