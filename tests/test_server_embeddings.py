"""End to end over a real socket: embeddings scored by the server equal `bliss score --local`."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from sqlalchemy import text

from bliss.client import Batch, BlissClient, ScoringServiceError
from bliss.server.runtime import BackgroundServer
from bliss.store.database import create_store_engine
from tests.cli_runner import run_cli
from tests.serving_fixtures import (
    build_from_embeddings,
    embedding_items_match,
    local_lines,
    server_settings,
)
from tests.synthetic_embeddings import synthetic_world


@pytest.fixture
def world():
    return synthetic_world(classes=4, entries=300, per_class=30, tests=16, seed=3)


def test_remote_scores_equal_local_scores(world, tmp_path, store_url):
    data = tmp_path / "data"
    build_from_embeddings(
        world, tmp_path / "bundle", data, store_url, extra=("--calibration-fraction", "0.3")
    )
    np.save(tmp_path / "test.npy", world.test)
    with BackgroundServer(server_settings(data, store_url)) as server:
        for options in (
            ("--class-scores",),
            ("--mode", "ic", "--k", "3"),
            ("--mode", "ic_raw", "--k", "5", "--lambda", "0.75"),
            ("--k", "7", "--lambda", "0.25", "--class-scores"),
        ):
            common = ("--embeddings", tmp_path / "test.npy", "--batch-size", "5", *options)
            local = local_lines(data, store_url, "--index", "demo", *common)
            remote = run_cli("score", "--server", server.address, *common, data_dir=data)
            assert remote.code == 0, remote.stderr
            remote_lines = [json.loads(line) for line in remote.stdout.splitlines()]
            embedding_items_match(remote_lines, local)
            assert [r.get("normal_quantile") for r in remote_lines] == [
                line.get("normal_quantile") for line in local
            ]
        # The calibrated default mode reports quantiles, and they are not all alike.
        assert len({line["normal_quantile"] for line in local_lines(
            data, store_url, "--index", "demo", "--embeddings", tmp_path / "test.npy"
        )}) > 3  # fmt: skip

        ids = [f"test.npy#{i}" for i in range(len(world.test))]
        with BlissClient(server.address) as client:
            items = client.score(embeddings=world.test, ids=ids, class_scores=True)
        local = local_lines(
            data, store_url, "--index", "demo", "--embeddings", tmp_path / "test.npy",
            "--class-scores",
        )  # fmt: skip
        embedding_items_match([item.to_json_dict() for item in items], local)


def test_stream_returns_every_id_in_order(world, tmp_path):
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    batches = [
        Batch(embeddings=world.test[start : start + 3], ids=[f"s{start + i}" for i in range(3)])
        for start in range(0, 15, 3)
    ]
    with BackgroundServer(server_settings(data)) as server, BlissClient(server.address) as client:
        streamed = list(client.score_stream(batches, k=4))
        unary = client.score(embeddings=world.test[:15], k=4)
    assert [[item.id for item in batch] for batch in streamed] == [list(b.ids) for b in batches]
    flat = [item for batch in streamed for item in batch]
    # Different batch compositions: equal up to float rounding.
    np.testing.assert_allclose([i.score for i in flat], [i.score for i in unary], atol=1e-9)
    assert all(len(item.top_entries) == 4 for item in flat)


def test_stream_stops_at_a_bad_message_and_names_it(world, tmp_path):
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    bad = world.test[:2].copy()
    bad[1, 0] = np.nan
    batches = [Batch(embeddings=world.test[:2]), Batch(embeddings=bad, ids=["a", "b"])]
    with BackgroundServer(server_settings(data)) as server, BlissClient(server.address) as client:
        received = []
        with pytest.raises(ScoringServiceError) as caught:
            for items in client.score_stream(batches):
                received.append(items)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "stream message 1: item 1 (id 'b')" in caught.value.details
        assert [len(items) for items in received] == [2]
        assert len(client.score(embeddings=world.test[:1])) == 1  # still serving


def test_info_health_and_reflection(world, tmp_path):
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "b1", data, name="demo")
    wide = synthetic_world(classes=3, entries=120, per_class=10, tests=4, dim=48, seed=5)
    build_from_embeddings(wide, tmp_path / "b2", data, name="wide")
    settings = server_settings(data, reflection=True)
    with BackgroundServer(settings) as server, BlissClient(server.address) as client:
        indexes = client.list_indexes()
        assert [(i.label, i.embedding_dim, i.dictionary_size) for i in indexes] == [
            ("demo@1", 32, 300),
            ("wide@1", 48, 120),
        ]
        info = client.index_info("wide")
        assert info.classes == ("class 0", "class 1", "class 2")
        assert (info.default_k, info.default_lambda, info.eps) == (10, 0.5, 1e-8)
        assert info.model_name == "precomputed" and not info.accepts_images
        assert "precomputed embeddings" in info.images_unavailable_reason
        assert info.statistics_source == "mapped" and not info.calibrated
        assert info.activated_at is not None and info.loaded_at >= info.activated_at

        # Indexes of different dimensions side by side; the name is needed with two.
        assert client.score(embeddings=wide.test, index="wide")[0].index_version == "wide@1"
        assert client.score(embeddings=world.test, index="demo")[0].index_version == "demo@1"
        with pytest.raises(ScoringServiceError) as caught:
            client.score(embeddings=world.test)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "serves 2 indexes (demo, wide)" in caught.value.details

        assert client.health() == "SERVING"
        assert client.health("demo") == client.health("wide") == "SERVING"
        with pytest.raises(ScoringServiceError) as caught:
            client.health("no-such-index")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND

        # Reflection (asked for above) answers both protocol versions, and describes itself.
        channel = grpc.insecure_channel(server.address)
        for version in ("v1alpha", "v1"):
            reflect = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (answer,) = reflect(iter([request]))
            services = {s.name for s in answer.list_services_response.service}
            assert services == {
                "bliss.v1.AnomalyScorer",
                "inference.GRPCInferenceService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            for symbol in ("bliss.v1.Item", f"grpc.reflection.{version}.ServerReflection"):
                ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
                (answer,) = reflect(iter([ask]))
                assert answer.file_descriptor_response.file_descriptor_proto, (version, symbol)
        channel.close()


def test_mapped_memory_and_store_statistics_paths_agree(world, tmp_path, store_url):
    """Mapped artifacts; and, for versions built before them, memory or store gathers."""
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data, store_url)
    results = {}
    settings = server_settings(data, store_url)
    with BackgroundServer(settings) as server, BlissClient(server.address) as client:
        source = client.index_info().statistics_source
        results[source] = client.score(embeddings=world.test, k=7, class_scores=True)
    engine = create_store_engine(store_url or f"sqlite:///{data / 'bliss.sqlite3'}")
    with engine.begin() as connection:  # what a version built before artifacts looks like
        connection.execute(text("UPDATE index_versions SET artifacts_checksum = NULL"))
    engine.dispose()
    for budget in (2048, 0):
        settings = server_settings(data, store_url, memory_budget_mib=budget)
        with BackgroundServer(settings) as server, BlissClient(server.address) as client:
            source = client.index_info().statistics_source
            results[source] = client.score(embeddings=world.test, k=7, class_scores=True)
    assert set(results) == {"mapped", "memory", "store"}
    mapped = [m.to_json_dict() for m in results["mapped"]]
    for source in ("memory", "store"):
        assert [r.to_json_dict() for r in results[source]] == mapped
