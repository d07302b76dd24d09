"""Static bearer-token check: ``authorization: Bearer TOKEN`` or UNAUTHENTICATED.

The check runs on the call's metadata alone, before the request body is read: a refused
call is answered by a handler that never looks at its request (the scorer's handlers
take raw bytes, so nothing is parsed either). Health checks stay open so load balancers
and orchestrators can probe without the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bliss.server.metrics import ServerMetrics

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_AUTHORIZATION = "authorization"
_SCHEME = "bearer "


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, metrics: ServerMetrics) -> None:
        self._token = token.encode()
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        self._metrics.unauthenticated.inc()
        method = handler_call_details.method.rsplit("/", 1)[-1]
        code = grpc.StatusCode.UNAUTHENTICATED.name
        self._metrics.requests.labels(method, code).inc()
        self._metrics.errors.labels(method, code).inc()
        return _refusing_handler(handler, problem)

    def _problem(self, metadata: tuple[tuple[str, Any], ...]) -> str | None:
        values = [value for key, value in metadata if key == _AUTHORIZATION]
        if not values:
            return "missing 'authorization: Bearer TOKEN' metadata: this server requires a token"
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        if not value.lower().startswith(_SCHEME):
            return "the authorization metadata must be 'Bearer TOKEN'"
        given = value[len(_SCHEME) :].strip().encode()
        if not hmac.compare_digest(given, self._token):
            return "wrong bearer token"
        return None


def _refusing_handler(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    async def refuse_streaming(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        yield  # pragma: no cover (makes this an async generator, as a streaming handler is)

    # No request deserializer: whatever the body holds, it is never parsed.
    codec = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_streaming, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_streaming, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)
