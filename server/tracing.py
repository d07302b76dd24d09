"""OpenTelemetry tracing of the server (``--tracing``, the ``otel`` extra).

One SERVER span per RPC, continuing the caller's trace when its metadata carries a W3C
``traceparent``, with child spans for the stages of scoring (decode, encode, search,
gather, score). Spans go to an OTLP/gRPC collector in batches; the standard ``OTEL_*``
variables configure the exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``, headers, TLS), the
sampler (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), the batching
(``OTEL_BSP_*``) and the resource (``OTEL_SERVICE_NAME``, default "bliss",
``OTEL_RESOURCE_ATTRIBUTES``).

opentelemetry is imported only when tracing starts: without ``--tracing`` the server runs
(and the extra may be missing) as if this module did not exist.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import grpc

from bliss import tracing
from bliss.errors import BlissError, InvalidInputError
from bliss.server.status_codes import status_code_for

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from bliss.server.settings import ServerSettings

logger = logging.getLogger(__name__)

PIP_COMMAND = "pip install 'bliss-anomaly[otel]'"
DEFAULT_SERVICE_NAME = "bliss"


class _OpenTelemetryBackend:
    """bliss.tracing's backend: spans of one tracer, children of the current span."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def span(self, name: str, attributes: tracing.Attributes) -> AbstractContextManager[Span]:
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def annotate(self, attributes: tracing.Attributes) -> None:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(attributes)


class Tracing:
    """The running tracer provider; close() exports what is left and turns tracing off."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def flush(self, timeout_s: float = 30) -> bool:
        """Export every finished span now; False if that took longer than ``timeout_s``."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def close(self) -> None:
        tracing.install(None)
        self.provider.shutdown()


def start_tracing(settings: ServerSettings) -> Tracing | None:
    """Install the OpenTelemetry backend when ``settings.tracing`` is on."""
    if not settings.tracing:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise InvalidInputError(
            f"--tracing needs OpenTelemetry, which is not installed ({error.name} is "
            f"missing): {PIP_COMMAND}, or serve with --no-tracing"
        ) from None
    # The SDK's own default would be "unknown_service"; the variable still wins.
    service = os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    # No global provider (trace.set_tracer_provider): it can be set once per process, and
    # a test process starts many servers. The sampler comes from OTEL_TRACES_SAMPLER.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
    tracing.install(_OpenTelemetryBackend(provider.get_tracer("bliss")))
    logger.info(
        "tracing on: service %s, OTLP to %s",
        service,
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "localhost:4317",
    )
    return Tracing(provider)


def _span_exporter() -> SpanExporter:
    """OTLP over gRPC, configured by the OTEL_EXPORTER_OTLP_* variables."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        raise InvalidInputError(
            f"--tracing needs the OTLP exporter, which is not installed ({error.name} is "
            f"missing): {PIP_COMMAND}, or serve with --no-tracing"
        ) from None
    return OTLPSpanExporter()


def rpc_span(method: str, context: grpc.aio.ServicerContext) -> AbstractContextManager[object]:
    """The SERVER span of one call of ``method`` when tracing is on, else nothing."""
    backend = tracing.installed()
    if not isinstance(backend, _OpenTelemetryBackend):
        return nullcontext()
    return _server_span(backend.tracer, method, context)


@contextmanager
def _server_span(tracer: Tracer, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    # Binary (-bin) values cannot carry a traceparent.
    carrier = {
        key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
    }
    with tracer.start_as_current_span(
        method,
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": method},
    ) as span:
        try:
            yield
        except BlissError as error:
            # The span records the exception and ERROR itself; the code is what clients see.
            span.set_attribute("rpc.grpc.status_code", status_code_for(error).value[0])
            raise
        except Exception:
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.INTERNAL.value[0])
            raise
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
