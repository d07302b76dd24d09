"""TLS, mutual TLS and the bearer token: the accepted paths and every rejection path."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from bliss.cli import main
from bliss.client import Batch, BlissClient, ScoringServiceError, TlsConfig
from bliss.server.runtime import BackgroundServer
from tests.cli_runner import run_cli
from tests.serving_fixtures import build_from_embeddings, server_settings, write_tls_files
from tests.synthetic_embeddings import synthetic_world

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=2, entries=40, per_class=8, tests=3, seed=4)


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    build_from_embeddings(world, root / "bundle", root / "data")
    return root / "data", write_tls_files(root / "tls")


def refused(client: BlissClient, world) -> ScoringServiceError:
    with pytest.raises(ScoringServiceError) as caught:
        client.score(embeddings=world.test, timeout_s=10)
    return caught.value


def test_tls_with_a_token(world, setup, tmp_path, capsys):
    data, tls = setup
    settings = server_settings(
        data, tls_cert=tls.server_cert, tls_key=tls.server_key, auth_token=TOKEN
    )
    with BackgroundServer(settings) as server:
        port = server.server.port
        trusted = TlsConfig(ca_cert=tls.ca)
        with BlissClient(f"localhost:{port}", tls=trusted, token=TOKEN) as client:
            assert len(client.score(embeddings=world.test)) == 3
            assert [len(b) for b in client.score_stream([Batch(embeddings=world.test)])] == [3]
        # Several servers by IP: certificates are checked against the name given.
        by_ip = TlsConfig(ca_cert=tls.ca, server_name="bliss.test")
        with BlissClient([f"127.0.0.1:{port}"] * 2, tls=by_ip, token=TOKEN) as client:
            assert client.index_info().label == "demo@1"

        with BlissClient(f"localhost:{port}", tls=trusted, max_retries=0) as client:
            error = refused(client, world)
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
            assert "missing 'authorization: Bearer TOKEN'" in error.details
            assert client.health() == "SERVING"  # health stays open to probes
            with pytest.raises(ScoringServiceError) as caught:
                list(client.score_stream([Batch(embeddings=world.test)]))
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with BlissClient(f"localhost:{port}", tls=trusted, token="wrong", max_retries=0) as c:
            assert refused(c, world).details == "wrong bearer token"
            with pytest.raises(ScoringServiceError) as caught:
                c.list_indexes()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        unauthenticated = server.server.metrics.registry.get_sample_value(
            "bliss_unauthenticated_calls_total"
        )
        assert unauthenticated == 4

        for tls_config in (None, TlsConfig(ca_cert=tls.other_ca)):
            with BlissClient(
                f"localhost:{port}", tls=tls_config, token=TOKEN, max_retries=0
            ) as client:
                assert refused(client, world).code == grpc.StatusCode.UNAVAILABLE

        # The command-line client: --ca-cert and a token file.
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        code = main(["health", "--server", f"localhost:{port}", "--ca-cert", str(tls.ca)])
        assert (code, capsys.readouterr().out) == (0, f"localhost:{port} SERVING\n")
        np.save(tmp_path / "test.npy", world.test)
        scored = run_cli(
            "score", "--server", f"localhost:{port}", "--embeddings", tmp_path / "test.npy",
            "--ca-cert", tls.ca, "--token-file", token_file, data_dir=data,
        )  # fmt: skip
        assert scored.code == 0, scored.stderr
        assert len(scored.stdout.splitlines()) == 3
        unauthorised = run_cli(
            "score", "--server", f"localhost:{port}", "--embeddings", tmp_path / "test.npy",
            "--ca-cert", tls.ca, "--retries", "0", data_dir=data,
        )  # fmt: skip
        assert unauthorised.code == 2
        assert "error: UNAUTHENTICATED: missing" in unauthorised.stderr


def test_mutual_tls(world, setup):
    data, tls = setup
    settings = server_settings(
        data, tls_cert=tls.server_cert, tls_key=tls.server_key, tls_client_ca=tls.ca
    )
    with BackgroundServer(settings) as server:
        address = f"localhost:{server.server.port}"
        with_certificate = TlsConfig(
            ca_cert=tls.ca, client_cert=tls.client_cert, client_key=tls.client_key
        )
        with BlissClient(address, tls=with_certificate) as client:
            assert len(client.score(embeddings=world.test)) == 3
        with BlissClient(address, tls=TlsConfig(ca_cert=tls.ca), max_retries=0) as client:
            assert refused(client, world).code == grpc.StatusCode.UNAVAILABLE


def test_the_token_is_checked_before_the_request_is_parsed(world, setup, monkeypatch):
    from bliss.server import scoring_service

    parsed = []
    original = scoring_service.parse_message

    def spied(raw, message_type):
        parsed.append(raw)
        return original(raw, message_type)

    monkeypatch.setattr(scoring_service, "parse_message", spied)
    data, _ = setup
    with BackgroundServer(server_settings(data, auth_token=TOKEN)) as server:
        channel = grpc.insecure_channel(server.address)
        score = channel.unary_unary("/bliss.v1.AnomalyScorer/Score")
        garbage = b"\xff\xfe not a protobuf message"
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                score(garbage, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert parsed == []  # refused on the metadata alone: the body was never parsed
        with pytest.raises(grpc.RpcError) as caught:
            score(garbage, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert parsed == [garbage]
        channel.close()
        errors = server.server.metrics.registry.get_sample_value(
            "bliss_errors_total", {"method": "Score", "code": "UNAUTHENTICATED"}
        )
        assert errors == 2
