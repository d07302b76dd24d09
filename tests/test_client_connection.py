"""The client's addressing, round-robin balancing, retries on UNAVAILABLE and deadlines."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from bliss.cli import main
from bliss.client import BlissClient, ScoringServiceError
from bliss.client.connection import channel_target, parse_endpoint, parse_servers, service_config
from bliss.errors import InvalidInputError
from bliss.scorer import Scorer
from bliss.server.runtime import BackgroundServer
from tests.serving_fixtures import build_from_embeddings, server_settings
from tests.synthetic_embeddings import synthetic_world


def test_addresses_parse_into_grpc_targets():
    assert parse_servers(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert parse_endpoint("[::1]:50051").host == "::1"
    assert channel_target(["127.0.0.1:7"]) == ("dns:///127.0.0.1:7", None)
    assert channel_target(["scoring.internal:7"]) == ("dns:///scoring.internal:7", None)
    assert channel_target(["unix:/run/bliss.sock"]) == ("unix:/run/bliss.sock", None)
    assert channel_target(["127.0.0.1:7", "127.0.0.2:8"]) == (
        "ipv4:127.0.0.1:7,127.0.0.2:8",
        "127.0.0.1",
    )
    assert channel_target(["localhost:7", "127.0.0.2:8"]) == (
        "ipv4:127.0.0.1:7,127.0.0.2:8",
        "localhost",
    )
    assert channel_target(["[::1]:7", "[::1]:8"]) == ("ipv6:[::1]:7,[::1]:8", "::1")
    for bad, message in [
        ("", "no server address given"),
        ("host", "is not HOST:PORT"),
        ("host:0", "is not HOST:PORT"),
        ("::1:50051", "in brackets"),
        ("[::1]:7,127.0.0.1:8", "mix IPv4 and IPv6"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            channel_target(parse_servers(bad))


def test_retry_policy_is_bounded():
    assert "methodConfig" not in json.loads(service_config(0))
    policy = json.loads(service_config(3))["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 4 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(service_config(0))["loadBalancingConfig"] == [{"round_robin": {}}]
    with pytest.raises(InvalidInputError, match="between 0 and 4"):
        service_config(5)


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=2, entries=40, per_class=8, tests=4, seed=6)


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("balancing")
    build_from_embeddings(world, root / "bundle", root / "data")
    return root


def scored_calls(server: BackgroundServer) -> float:
    registry = server.server.metrics.registry
    value = registry.get_sample_value("bliss_requests_total", {"method": "Score", "code": "OK"})
    return value or 0.0


def test_round_robin_spreads_calls_and_skips_a_stopped_server(world, store):
    data = store / "data"
    first = BackgroundServer(server_settings(data))
    second = BackgroundServer(server_settings(data))
    try:
        with BlissClient([first.address, second.address]) as client:
            for _ in range(20):
                client.score(embeddings=world.test)
            assert scored_calls(first) >= 5 and scored_calls(second) >= 5
            assert scored_calls(first) + scored_calls(second) == 20
            second.close()
            for _ in range(10):  # every call lands on the server that is still up
                assert len(client.score(embeddings=world.test)) == 4
    finally:
        first.close()
        second.close()


def test_calls_answered_unavailable_are_retried_on_another_server(world, store):
    # This server has the store but not the FAISS files: it answers UNAVAILABLE for 'demo'.
    broken_data = store / "empty-data-dir"
    broken_data.mkdir(exist_ok=True)
    store_url = f"sqlite:///{store / 'data' / 'bliss.sqlite3'}"
    broken = BackgroundServer(server_settings(broken_data, store_url))
    healthy = BackgroundServer(server_settings(store / "data"))
    try:
        with BlissClient([broken.address, healthy.address], max_retries=0) as client:
            outcomes = []
            for _ in range(12):
                try:
                    client.score(embeddings=world.test)
                    outcomes.append("ok")
                except ScoringServiceError as error:
                    assert error.code == grpc.StatusCode.UNAVAILABLE
                    assert "is active but its version demo@1 failed to load" in error.details
                    # Why (a missing FAISS file under the data dir) is in the server log only.
                    assert str(store) not in error.details and ".faiss" not in error.details
                    outcomes.append("unavailable")
            assert set(outcomes) == {"ok", "unavailable"}  # without retries, some fail
        with BlissClient([broken.address, healthy.address], max_retries=3) as client:
            for _ in range(12):
                assert len(client.score(embeddings=world.test)) == 4
    finally:
        broken.close()
        healthy.close()


def test_no_server_up_fails_unavailable_after_bounded_retries(world, store):
    server = BackgroundServer(server_settings(store / "data"))
    address = server.address
    server.close()
    with BlissClient(address, max_retries=2, timeout_s=20) as client:
        started = time.monotonic()
        with pytest.raises(ScoringServiceError) as caught:
            client.score(embeddings=world.test)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 10


def test_deadlines_are_honoured(world, store, monkeypatch):
    original = Scorer.score

    def slow_score(self, *args, **kwargs):
        time.sleep(1.0)
        return original(self, *args, **kwargs)

    with BackgroundServer(server_settings(store / "data")) as server:
        with BlissClient(server.address) as client:
            monkeypatch.setattr(Scorer, "score", slow_score)
            started = time.monotonic()
            with pytest.raises(ScoringServiceError) as caught:
                client.score(embeddings=world.test, timeout_s=0.2)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.9
            monkeypatch.setattr(Scorer, "score", original)
            time.sleep(1.0)  # let the abandoned batch finish
            assert len(client.score(embeddings=world.test)) == 4
        registry = server.server.metrics.registry
        expired = registry.get_sample_value(
            "bliss_errors_total", {"method": "Score", "code": "DEADLINE_EXCEEDED"}
        )
        assert expired == 1
        assert np.isfinite(
            registry.get_sample_value("bliss_request_latency_seconds_sum", {"method": "Score"})
        )


def test_health_command_reports_every_server(world, store, capsys):
    with BackgroundServer(server_settings(store / "data")) as server:
        down = BackgroundServer(server_settings(store / "data"))
        down_address = down.address
        down.close()
        servers = f"{server.address},{down_address}"
        assert main(["health", "--server", servers, "--deadline-s", "2", "--retries", "0"]) == 1
        up_line, down_line = capsys.readouterr().out.splitlines()
        assert up_line == f"{server.address} SERVING"
        assert down_line.startswith(f"{down_address} UNREACHABLE (UNAVAILABLE: ")
        assert main(["health", "--server", server.address, "--index", "demo"]) == 0
        assert main(["health", "--server", server.address, "--index", "nope"]) == 1
        assert capsys.readouterr().out.splitlines()[-1] == f"{server.address} SERVICE_UNKNOWN"
