"""Production hardening of the request surface: safe defaults, per-request budgets,
precise errors with field violations, capped and neutral messages, metrics by code."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import text

from bliss.client import AsyncBlissClient, BlissClient, FieldViolation, ScoringServiceError
from bliss.errors import NotFoundError, StoreError
from bliss.scorer import Scorer
from bliss.scoring import ScoringMode
from bliss.server.request_limits import (
    ENTRY_TEXT_MAX_BYTES,
    ResponseShape,
    clip_entry_text,
    response_size_bound,
)
from bliss.server.runtime import BackgroundServer
from bliss.server.scoring_requests import ScoringOptions, build_response
from bliss.server.settings import ServerSettings
from bliss.store.database import create_store_engine
from tests.cli_runner import run_cli
from tests.serving_fixtures import build_from_embeddings, server_settings
from tests.synthetic_embeddings import synthetic_world

MAX_K = 20
ENTRIES = 50
SCORE = "/bliss.v1.AnomalyScorer/Score"


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=3, entries=ENTRIES, per_class=10, tests=6, seed=21)


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    build_from_embeddings(world, root / "bundle", root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def server(data):
    with BackgroundServer(server_settings(data, max_k=MAX_K, max_message_mib=1)) as running:
        yield running


@pytest.fixture
def client(server):
    with BlissClient(server.address, max_retries=0) as connected:
        yield connected


def refusal(client: BlissClient, **kwargs) -> ScoringServiceError:
    with pytest.raises(ScoringServiceError) as caught:
        client.score(**kwargs)
    return caught.value


def error_count(server: BackgroundServer, method: str, code: str) -> float:
    registry = server.server.metrics.registry
    labels = {"method": method, "code": code}
    return registry.get_sample_value("bliss_errors_total", labels) or 0.0


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on ``port`` (from the kernel's tables)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                ip = ipaddress.ip_address(
                    b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                )
                mapped = getattr(ip, "ipv4_mapped", None)
                found.add(mapped or ip)
    return found


# ---------------------------------------------------------------------- safe defaults


def test_serve_listens_on_loopback_unless_told(data, monkeypatch):
    defaults = ServerSettings(data_dir=data)
    assert (defaults.host, defaults.metrics_host, defaults.reflection) == (
        "127.0.0.1",
        "127.0.0.1",
        False,
    )
    monkeypatch.setenv("BLISS_HOST", "0.0.0.0")
    monkeypatch.setenv("BLISS_METRICS_HOST", "0.0.0.0")
    exposed = ServerSettings(data_dir=data)
    assert (exposed.host, exposed.metrics_host) == ("0.0.0.0", "0.0.0.0")
    monkeypatch.delenv("BLISS_HOST")
    monkeypatch.delenv("BLISS_METRICS_HOST")

    settings = ServerSettings(data_dir=data, port=0, metrics_port=0, poll_interval_s=3600)
    with BackgroundServer(settings) as running:
        loopback = {ipaddress.ip_address("127.0.0.1")}
        assert listening_addresses(running.server.port) == loopback
        assert listening_addresses(running.server.metrics_port) == loopback


def test_exposing_the_server_without_tls_or_token_warns_once(data, caplog):
    with caplog.at_level(logging.WARNING), BackgroundServer(server_settings(data, host="0.0.0.0")):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert "\n" not in line
    assert line.startswith("listening on 0.0.0.0, reachable from other machines, without TLS")
    assert "without a token" in line

    def warning(**values) -> str | None:
        return ServerSettings(data_dir=data, **values).exposure_warning()

    for host in ("127.0.0.1", "localhost", "[::1]", "::1"):
        assert warning(host=host) is None, host
    certificates = {"tls_cert": Path("c.pem"), "tls_key": Path("k.pem")}
    assert warning(host="0.0.0.0", auth_token="t", **certificates) is None
    assert "without TLS:" in warning(host="[::]", auth_token="t")
    assert "without a token:" in warning(host="scoring.internal", **certificates)


def test_reflection_is_off_by_default(server):
    channel = grpc.insecure_channel(server.address)
    for version in ("v1", "v1alpha"):
        reflect = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(reflect(iter([b""]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--grace-period-s", "inf", "--grace-period-s / BLISS_GRACE_PERIOD_S: Input should be "),
        ("--max-image-mib", "nan", "--max-image-mib / BLISS_MAX_IMAGE_MIB: Input should be a"),
        ("--poll-interval-s", "1e308", "--poll-interval-s / BLISS_POLL_INTERVAL_S: Input should"),
        ("--max-k", "0", "--max-k / BLISS_MAX_K: Input should be greater than or equal to 1"),
        ("--max-request-pixels", "-5", "--max-request-pixels / BLISS_MAX_REQUEST_PIXELS: Input"),
    ],
)
def test_absurd_server_settings_are_refused_in_one_line(data, flag, value, message):
    result = run_cli("serve", "--port", "0", flag, value, data_dir=data)
    assert result.code == 2
    assert result.stderr.startswith("error: bad server setting: " + message)
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(("column", "value"), [("default_lambda", 1e308), ("default_k", 0)])
def test_a_version_with_unusable_defaults_is_not_served(world, tmp_path, caplog, column, value):
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    engine = create_store_engine(f"sqlite:///{data / 'bliss.sqlite3'}")
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE index_versions SET {column} = :value"), {"value": value})
    engine.dispose()
    with (
        caplog.at_level(logging.WARNING),
        BackgroundServer(server_settings(data)) as running,
        BlissClient(running.address, max_retries=0) as client,
    ):
        assert client.health("demo") == "NOT_SERVING"
        error = refusal(client, embeddings=world.test)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert str(data) not in error.details
    (line,) = [r.getMessage() for r in caplog.records if "unusable scoring defaults" in r.message]
    assert line.startswith("cannot load demo@1: demo@1 has unusable scoring defaults (default ")


# ---------------------------------------------------------------------- budgets


def test_k_has_a_server_maximum(world, client):
    error = refusal(client, embeddings=world.test, k=MAX_K + 1)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith(
        f"K={MAX_K + 1} is over the server's limit of {MAX_K} (--max-k)"
    )
    assert error.violations == (FieldViolation("options.k", f"must be at most {MAX_K}"),)
    assert len(client.score(embeddings=world.test, k=MAX_K)[0].top_entries) == MAX_K


def test_a_response_over_the_message_limit_is_refused_before_scoring(
    world, server, client, monkeypatch
):
    calls = []
    original = Scorer.score

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", counted)
    many = np.repeat(world.test, 400, axis=0)  # 2,400 items: a 300 KiB request
    before = error_count(server, "Score", "INVALID_ARGUMENT")
    started = time.monotonic()
    error = refusal(client, embeddings=many, k=MAX_K, class_scores=True)
    assert time.monotonic() - started < 2
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith(f"the response to 2400 items (K={MAX_K}, top entries, class ")
    assert "over the server's message limit of 1 MiB (--max-message-mib): split it into " in (
        error.details
    )
    assert [v.field for v in error.violations] == ["items"]
    assert calls == []  # refused before any scoring work
    assert error_count(server, "Score", "INVALID_ARGUMENT") == before + 1
    # Without the top entries the same batch fits, and is scored.
    assert len(client.score(embeddings=many, top_entries=False)) == 2400
    assert len(calls) == -(-2400 // 256)  # scored, in micro-batches of 256


def test_the_response_size_bound_is_an_upper_bound(world, server):
    served = server.server.registry.resolve("")
    rng = np.random.default_rng(5)
    cases = [
        (["", "a", "é" * 300, "🙂" * 50], 1, True, False),
        ([f"cam/{i:05d}.jpg" for i in range(64)], MAX_K, True, True),
        (["x" * 5000] * 3, 7, False, True),
    ]
    for ids, k, top_entries, class_scores in cases:
        embeddings = rng.normal(size=(len(ids), world.test.shape[1])).astype(np.float32)
        batch = served.scorer.score(embeddings, k=k)
        options = ScoringOptions(
            mode=ScoringMode.BLISS, k=k, class_scores=class_scores, top_entries=top_entries
        )
        actual = build_response(batch, served.scorer, ids, options).ByteSize()
        shape = ResponseShape(ids, k, top_entries, class_scores)
        bound = response_size_bound(shape, served.scorer, served.entry_text_bound)
        assert actual <= bound <= 2 * actual + 1024, (ids[:1], actual, bound)
    assert served.entry_text_bound == len(f"entry {ENTRIES - 1}")  # exact for mapped texts


def test_long_entry_texts_are_clipped_within_the_budget():
    assert clip_entry_text("tabby cat") == "tabby cat"
    for character in ("a", "é", "🙂"):
        long = character * 5000
        clipped = clip_entry_text(long)
        assert len(clipped.encode("utf-8")) <= ENTRY_TEXT_MAX_BYTES
        kept = clipped.split("…(+")[0]
        assert long.startswith(kept) and clipped.endswith(f"…(+{5000 - len(kept)} chars)")


# ---------------------------------------------------------------------- bad input


def test_lambda_k_and_embeddings_are_checked_naming_the_item(world, client):
    for lam in (-0.5, float("inf"), 1e308):
        error = refusal(client, embeddings=world.test, lam=lam)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, lam
        assert error.details == f"lambda must be a finite number between 0 and 1e+06, got {lam}"
        assert [v.field for v in error.violations] == ["options.lambda_weight"]
    assert len(client.score(embeddings=world.test, lam=0.0)) == len(world.test)

    rows = world.test[:4].copy()
    rows[1] *= 1e-8  # finite and not zero, but no usable direction
    rows[3] = 0
    error = refusal(client, embeddings=rows, ids=["a", "tiny", "c", "zero"])
    assert error.details.startswith("item 3 (id 'zero'): the embedding is all zeros")
    rows[3] = world.test[3]
    error = refusal(client, embeddings=rows, ids=["a", "tiny", "c", "d"])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("item 1 (id 'tiny'): the embedding's L2 norm is below 1e-06")
    assert [v.field for v in error.violations] == ["items[1].embedding"]
    # A huge but finite vector is fine: the server normalises it (in float64).
    rows[1] = world.test[1] * 1e30
    scaled = client.score(embeddings=rows)
    assert scaled[1].score == pytest.approx(client.score(embeddings=world.test[:4])[1].score)


def test_violations_reach_the_sync_and_the_async_client(world, server, client):
    rows = world.test[:3].copy()
    rows[1, 0] = np.nan
    rows[2, 5] = np.inf
    error = refusal(client, embeddings=rows, ids=["a", "b", "c"])
    expected = tuple(
        FieldViolation(f"items[{i}].embedding", "NaN or infinite values in the embedding")
        for i in (1, 2)
    )
    assert error.violations == expected

    async def async_refusal() -> ScoringServiceError:
        async with AsyncBlissClient(server.address, max_retries=0) as connected:
            with pytest.raises(ScoringServiceError) as caught:
                await connected.score(embeddings=rows, ids=["a", "b", "c"])
            return caught.value

    async_error = asyncio.run(async_refusal())
    assert (async_error.code, async_error.violations) == (error.code, expected)
    assert error.details == async_error.details


def test_unparsable_messages_get_invalid_argument_without_a_traceback(server, caplog):
    channel = grpc.insecure_channel(server.address)
    invalid_utf8_id = b"\x0a\x03\x0a\x01\xff"  # items[0].id = b"\xff"
    before = error_count(server, "Score", "INVALID_ARGUMENT")
    with caplog.at_level(logging.INFO):
        for body in (b"\xff\xff\xff\xff", invalid_utf8_id):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(SCORE)(body, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid bliss.v1.ScoreRequest message" in caught.value.details()
        stream = channel.stream_stream("/bliss.v1.AnomalyScorer/ScoreStream")
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([b"\xff\xff"]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("stream message 0: the request is not a valid")
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/bliss.v1.AnomalyScorer/GetIndexInfo")(b"\xff", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert error_count(server, "Score", "INVALID_ARGUMENT") == before + 2
    assert error_count(server, "ScoreStream", "INVALID_ARGUMENT") >= 1
    assert error_count(server, "GetIndexInfo", "INVALID_ARGUMENT") >= 1


def test_huge_ids_and_names_are_shortened_in_messages_and_logs(world, server, client, caplog):
    rows = world.test[:2].copy()
    rows[1, 0] = np.nan
    huge = "x" * 100_000
    with caplog.at_level(logging.INFO):
        error = refusal(client, embeddings=rows, ids=["ok", huge])
        missing = refusal(client, embeddings=world.test, index="y" * 100_000)
    assert error.details.startswith(f"item 1 (id '{'x' * 64}…(+99936 chars)'): NaN or infinite")
    assert len(error.details) < 300
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert f"no active index is named '{'y' * 64}…(+99936 chars)'" in missing.details
    assert len(missing.details) < 300
    assert max(len(record.getMessage()) for record in caplog.records) < 1000
    assert len(client.score(embeddings=world.test[:1], ids=[huge])) == 1  # echoed intact
    # Five 4-byte characters ids, percent-encoded in the trailer: still readable.
    rows = np.full((6, world.test.shape[1]), np.nan, np.float32)
    emoji = refusal(client, embeddings=rows, ids=["🙂" * 20_000] * 6)
    assert emoji.code == grpc.StatusCode.INVALID_ARGUMENT
    assert emoji.details.endswith(" and 1 more: NaN or infinite values in the embedding")
    assert len(emoji.violations) == 5


def test_non_finite_outputs_are_never_returned(world, client, monkeypatch):
    original = Scorer.score

    def broken(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        batch.score[1] = np.nan
        return batch

    monkeypatch.setattr(Scorer, "score", broken)
    error = refusal(client, embeddings=world.test[:3], ids=["a", "b", "c"])
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.details.startswith("item 1 (id 'b'): index demo@1 produced a NaN or infinite")


@pytest.mark.parametrize(
    ("failure", "code", "message"),
    [
        (
            StoreError("cannot reach postgresql://bliss:pw@db.internal/bliss (timeout)"),
            grpc.StatusCode.UNAVAILABLE,
            "the statistics store is unavailable; retry later (reference ",
        ),
        (
            NotFoundError("/srv/bliss/data/indexes/demo/1/entry_texts.utf8 is missing"),
            grpc.StatusCode.INTERNAL,
            "index demo@1 could not be read while scoring (reference ",
        ),
    ],
)
def test_clients_never_see_server_paths_or_urls(
    world, client, monkeypatch, caplog, failure, code, message
):
    def failing(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(Scorer, "score", failing)
    with caplog.at_level(logging.INFO):
        error = refusal(client, embeddings=world.test)
    assert error.code == code
    assert error.details.startswith(message)
    for secret in ("postgresql", "db.internal", "/srv/"):
        assert secret not in error.details
    reference = error.details.split("reference ")[1][:8]
    assert any(
        reference in r.getMessage() and str(failure) in r.getMessage() for r in caplog.records
    )
