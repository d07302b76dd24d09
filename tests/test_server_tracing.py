"""Tracing (--tracing, the otel extra) and the standard Prometheus collectors: the span tree
of native Score calls, error statuses, nothing traced or imported when off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bliss import tracing
from bliss.client import BlissClient, ScoringServiceError
from bliss.errors import InvalidInputError
from bliss.server import tracing as server_tracing
from bliss.server.runtime import BackgroundServer
from bliss.server.settings import ServerSettings
from tests.serving_fixtures import server_settings
from tests.test_server_images import shapes  # noqa: F401 (a fixture)

SCORING_STAGES = ["search", "gather", "score"]


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(shapes, exporter):  # noqa: F811 (the imported fixture)
    data, _ = shapes
    settings = server_settings(data, tracing=True, metrics=True, metrics_port=0)
    # The in-memory exporter in place of OTLP: the rest of the set-up is the real one.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_tracing, "_span_exporter", lambda: exporter)
        with BackgroundServer(settings) as running:
            yield running
    assert tracing.installed() is None  # the server's stop turned tracing off


def finished_spans(server: BackgroundServer, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert server.server.tracing is not None
    assert server.server.tracing.flush()
    spans = list(exporter.get_finished_spans())
    exporter.clear()
    return spans


def rpc_and_children(spans: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one SERVER span, and the others (each asserted to be its child)."""
    (rpc,) = [span for span in spans if span.kind is SpanKind.SERVER]
    children = [span for span in spans if span is not rpc]
    assert rpc.parent is None
    for child in children:
        assert child.context.trace_id == rpc.context.trace_id
        assert child.parent is not None and child.parent.span_id == rpc.context.span_id
    return rpc, sorted(children, key=lambda span: span.start_time or 0)


def test_embeddings_score_call_is_one_server_span_with_scoring_stages(traced, exporter):
    finished_spans(traced, exporter)
    vectors = np.random.default_rng(0).normal(
        size=(2, traced.server.registry.resolve("shapes").scorer.dim)
    )
    with BlissClient(traced.address) as client:
        client.score(embeddings=vectors.astype(np.float32), k=3, index="shapes")
    rpc, children = rpc_and_children(finished_spans(traced, exporter))
    assert rpc.name == "Score"
    assert rpc.status.status_code is StatusCode.UNSET
    assert dict(rpc.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.method": "Score",
        "rpc.grpc.status_code": 0,
        "bliss.index": "shapes",
        "bliss.version": 1,
        "bliss.items": 2,
        "bliss.k": 3,
        "bliss.mode": "bliss",
    }
    assert [span.name for span in children] == SCORING_STAGES
    search, gather, score = children
    assert search.attributes == {"bliss.items": 2, "bliss.k": 3}
    assert gather.attributes is not None and "bliss.source" in gather.attributes
    assert score.attributes == {"bliss.mode": "bliss"}
    assert traced.server.tracing is not None
    resource = traced.server.tracing.provider.resource.attributes
    assert resource["service.name"] == "bliss"


def test_image_score_call_traces_decode_and_encode(shapes, traced, exporter):  # noqa: F811
    _, images = shapes
    finished_spans(traced, exporter)
    with BlissClient(traced.address) as client:
        client.score(images=[images[0], images[1]], k=2)
    rpc, children = rpc_and_children(finished_spans(traced, exporter))
    assert rpc.name == "Score"
    assert rpc.attributes is not None and rpc.attributes["bliss.items"] == 2
    assert [span.name for span in children] == ["decode", "encode", *SCORING_STAGES]
    decode, encode = children[:2]
    assert decode.attributes == {"bliss.images": 2}
    assert encode.attributes is not None and encode.attributes["bliss.images"] == 2


def test_failed_call_has_error_status(traced, exporter):
    finished_spans(traced, exporter)
    with BlissClient(traced.address) as client, pytest.raises(ScoringServiceError):
        client.score(images=[b"not an image"])
    rpc, children = rpc_and_children(finished_spans(traced, exporter))
    assert rpc.status.status_code is StatusCode.ERROR
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == 3
    assert [event.name for event in rpc.events] == ["exception"]
    (decode,) = children
    assert decode.name == "decode" and decode.status.status_code is StatusCode.ERROR


def test_metrics_endpoint_shows_process_and_platform_metrics(traced):
    url = f"http://127.0.0.1:{traced.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for name in ("process_resident_memory_bytes", "python_info", "python_gc_objects_collected"):
        assert f"\n{name}" in text, name


def test_tracing_without_the_extra_is_a_one_line_error(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)
    settings = ServerSettings(data_dir=tmp_path, tracing=True)
    with pytest.raises(InvalidInputError, match=r"pip install 'bliss-anomaly\[otel\]'") as error:
        server_tracing.start_tracing(settings)
    assert "\n" not in str(error.value)


def test_tracing_off_traces_nothing_and_imports_no_opentelemetry(shapes):  # noqa: F811
    data, images = shapes
    # A fresh interpreter: this test process has opentelemetry imported already.
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path

        from bliss import tracing
        from bliss.client import BlissClient
        from bliss.server.runtime import BackgroundServer
        from tests.serving_fixtures import server_settings

        with BackgroundServer(server_settings(Path({str(data)!r}))) as running:
            assert running.server.tracing is None
            with BlissClient(running.address) as client:
                client.score(images=[Path({str(images[0])!r})])
        assert tracing.installed() is None
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],  # tests.* importable
    )
    assert result.returncode == 0, result.stderr
