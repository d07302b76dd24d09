"""BlissClient: the blocking Python client of the scoring service.

with BlissClient("10.0.0.5:50051,10.0.0.6:50051", token=token) as client:
    items = client.score(images=["cam7/0012.jpg"], index="shapes")
    print(items[0].score, items[0].nearest_class)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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
from bliss.index_version_info import IndexInfo
from bliss.scored_item import ScoredItem
from bliss.scoring import ScoringMode
from bliss.scoring_options import ScoringOptions
from bliss.v1 import scorer_pb2, scorer_pb2_grpc

DEFAULT_TIMEOUT_S = 60.0


class BlissClient:
    """Calls one or several servers (round-robin, retries on UNAVAILABLE, deadlines).

    Args:
        servers: ``HOST:PORT``, several as ``'a:1,b:2'`` or a list.
        tls: True for TLS with the system's roots, or a TlsConfig (CA, mTLS, name).
        token: bearer token sent as ``authorization: Bearer ...``.
        timeout_s: deadline of each call (None: none; per-call ``timeout_s`` overrides).
        max_retries: retries of a call that failed UNAVAILABLE (0 to 4), with backoff.
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
            self._channel = grpc.insecure_channel(plan.target, options=plan.options)
        else:
            self._channel = grpc.secure_channel(plan.target, plan.credentials, options=plan.options)
        self._metadata = plan.metadata
        self._timeout_s = timeout_s
        self._scorer = scorer_pb2_grpc.AnomalyScorerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def score(
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
        return scored_items(self._call(self._scorer.Score, request, timeout_s))

    def score_stream(
        self,
        batches: Iterable[Batch],
        *,
        index: str = "",
        mode: str = "bliss",
        k: int | None = None,
        lam: float | None = None,
        class_scores: bool = False,
        top_entries: bool = True,
        timeout_s: float | None = None,
    ) -> Iterator[list[ScoredItem]]:
        """Score batches over one stream; yields each batch's items as they come back, in order.

        ``timeout_s`` bounds the whole stream (default: none).
        """
        options = ScoringOptions(
            index, ScoringMode.parse(mode), k, lam, class_scores, top_entries
        ).to_proto()
        requests = (score_request(batch, options) for batch in batches)
        responses = self._scorer.ScoreStream(
            requests, timeout=self._timeout(timeout_s), metadata=self._metadata
        )
        try:
            for response in responses:
                yield scored_items(response)
        except grpc.RpcError as error:
            raise ScoringServiceError.from_rpc_error(error) from None
        finally:
            responses.cancel()

    def index_info(self, index: str = "", *, timeout_s: Timeout = USE_CLIENT_DEFAULT) -> IndexInfo:
        """The served version of ``index`` (may be omitted when the server serves one)."""
        request = scorer_pb2.GetIndexInfoRequest(index=index)
        return IndexInfo.from_proto(self._call(self._scorer.GetIndexInfo, request, timeout_s))

    def list_indexes(self, *, timeout_s: Timeout = USE_CLIENT_DEFAULT) -> list[IndexInfo]:
        response = self._call(self._scorer.ListIndexes, scorer_pb2.ListIndexesRequest(), timeout_s)
        return [IndexInfo.from_proto(info) for info in response.indexes]

    def health(self, service: str = "", *, timeout_s: Timeout = USE_CLIENT_DEFAULT) -> str:
        """'SERVING', 'NOT_SERVING', ... of the server ('') or of one index name."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BlissClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeout(self, timeout_s: Timeout) -> float | None:
        return self._timeout_s if isinstance(timeout_s, UseClientDefault) else timeout_s

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable, request: Message, timeout_s: Timeout
    ) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as error:
            raise ScoringServiceError.from_rpc_error(error) from None
