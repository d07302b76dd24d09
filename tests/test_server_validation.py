"""Every invalid request gets its own status and a message naming the item; the server
keeps serving the good requests around them."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from bliss.client import BlissClient
from bliss.server.runtime import BackgroundServer
from bliss.v1 import scorer_pb2, scorer_pb2_grpc
from tests.serving_fixtures import build_from_embeddings, server_settings
from tests.synthetic_embeddings import synthetic_world

DIM = 32
MAX_ITEMS = 8


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=3, entries=50, per_class=10, tests=6, seed=11)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    build_from_embeddings(world, root / "bundle", root / "data")
    settings = server_settings(root / "data", max_batch_items=MAX_ITEMS, max_message_mib=1)
    with BackgroundServer(settings) as running:
        yield running


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield scorer_pb2_grpc.AnomalyScorerStub(channel)
    channel.close()


def embedding(vector, dim=None) -> scorer_pb2.Item:
    values = np.asarray(vector, dtype="<f4")
    return scorer_pb2.Embedding(values=values.tobytes(), dim=len(values) if dim is None else dim)


def item(vector, item_id="", dim=None) -> scorer_pb2.Item:
    return scorer_pb2.Item(id=item_id, embedding=embedding(vector, dim))


def failure(stub, items, **options) -> tuple[grpc.StatusCode, str]:
    request = scorer_pb2.ScoreRequest(items=items, options=scorer_pb2.ScoreOptions(**options))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, timeout=30)
    return caught.value.code(), caught.value.details()


def test_each_invalid_request_gets_its_status(world, stub):
    good = [item(row, f"good-{i}") for i, row in enumerate(world.test[:3])]
    nan, inf = world.test[0].copy(), world.test[0].copy()
    nan[3], inf[0] = np.nan, np.inf
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (
            [*good, item(np.ones(DIM + 1), "long")],
            {},
            invalid,
            "item 3 (id 'long'): the embedding has dimension 33; index demo@1 takes "
            "32-dimensional float32 embeddings (128 bytes, little-endian)",
        ),
        (
            [*good, item(np.ones(DIM), "liar", dim=DIM + 2)],
            {},
            invalid,
            "item 3 (id 'liar'): embedding.values holds 32 float32 values but embedding.dim is 34",
        ),
        (
            [
                *good,
                scorer_pb2.Item(
                    id="odd", embedding=scorer_pb2.Embedding(values=b"\0" * 127, dim=DIM)
                ),
            ],
            {},
            invalid,
            "item 3 (id 'odd'): embedding.values has 127 bytes, not a whole number",
        ),
        (
            [good[0], item(nan, "n"), item(inf)],
            {},
            invalid,
            "item 1 (id 'n'), item 2: NaN or infinite values in the embedding",
        ),
        (
            [item(np.zeros(DIM), "zero")],
            {},
            invalid,
            "item 0 (id 'zero'): the embedding is all zeros",
        ),
        ([], {}, invalid, "the request has no items"),
        ([*good, scorer_pb2.Item(id="hollow")], {}, invalid, "item 3 (id 'hollow') has neither"),
        (good, {"index": "nope"}, grpc.StatusCode.NOT_FOUND, "no active index is named 'nope'"),
        (good, {"k": 51}, invalid, "K=51 must be between 1 and the dictionary size of demo@1 (50"),
        (good, {"k": 0}, invalid, "K=0 must be between 1"),
        (good, {"lambda_weight": float("nan")}, invalid, "lambda must be a finite number"),
        (good, {"mode": 7}, invalid, "unknown scoring mode 7"),
        (
            [item(world.test[0], str(i)) for i in range(MAX_ITEMS + 1)],
            {},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the request has 9 items, over the server's limit of 8",
        ),
        (
            [scorer_pb2.Item(id="photo", image=b"\x89PNG....")],
            {},
            grpc.StatusCode.FAILED_PRECONDITION,
            "item 0 (id 'photo') is an image, but index demo@1 cannot encode images: demo@1 was "
            "built from precomputed embeddings",
        ),
    ]
    for items, options, code, message in cases:
        got_code, details = failure(stub, items, **options)
        assert got_code == code, (message, got_code, details)
        assert message in details, (message, details)


def test_a_message_over_the_size_limit_is_refused_by_grpc(world, stub):
    huge = scorer_pb2.Item(id="big", image=b"\xff" * (2 * 2**20))
    code, details = failure(stub, [huge])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details


def test_bad_requests_do_not_disturb_good_ones(world, server, stub):
    expected = None
    errors: list[BaseException] = []
    with BlissClient(server.address) as client:
        expected = [i.score for i in client.score(embeddings=world.test)]

        def good_caller() -> None:
            try:
                for _ in range(15):
                    scores = [i.score for i in client.score(embeddings=world.test)]
                    np.testing.assert_allclose(scores, expected, atol=1e-12)
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=good_caller) for _ in range(3)]
        for thread in threads:
            thread.start()
        for _ in range(15):
            failure(stub, [item(np.full(DIM, np.nan), "bad")])
            failure(stub, [scorer_pb2.Item(id="img", image=b"junk")])
        for thread in threads:
            thread.join()
        assert errors == []
        assert client.health() == "SERVING"
        metrics = server.server.metrics.registry
        assert (
            metrics.get_sample_value(
                "bliss_errors_total", {"method": "Score", "code": "INVALID_ARGUMENT"}
            )
            >= 15
        )
        assert (
            metrics.get_sample_value("bliss_requests_total", {"method": "Score", "code": "OK"})
            >= 45
        )
