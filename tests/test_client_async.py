"""AsyncBlissClient: the same answers as BlissClient, awaited."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from bliss.client import AsyncBlissClient, Batch, BlissClient, ScoringServiceError
from bliss.server.runtime import BackgroundServer
from tests.serving_fixtures import build_from_embeddings, server_settings
from tests.synthetic_embeddings import synthetic_world


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=3, entries=60, per_class=10, tests=9, seed=12)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    build_from_embeddings(world, root / "bundle", root / "data")
    with BackgroundServer(server_settings(root / "data")) as running:
        yield running


def test_async_client_matches_the_sync_client(world, server):
    with BlissClient(server.address) as client:
        expected = client.score(embeddings=world.test, k=5, class_scores=True)

    async def batches():
        for start in range(0, 9, 3):
            yield Batch(embeddings=world.test[start : start + 3], ids=[f"a{start}", "b", "c"])
            await asyncio.sleep(0)

    async def scenario():
        async with AsyncBlissClient(server.address) as client:
            unary = await client.score(embeddings=world.test, k=5, class_scores=True)
            concurrent = await asyncio.gather(
                *(client.score(embeddings=world.test[i : i + 1], k=5) for i in range(9))
            )
            streamed = [items async for items in client.score_stream(batches(), k=5)]
            info = await client.index_info()
            listing = await client.list_indexes()
            health = await client.health("demo")
            with pytest.raises(ScoringServiceError) as caught:
                await client.score(embeddings=world.test, index="missing")
            return unary, concurrent, streamed, info, listing, health, caught.value

    unary, concurrent, streamed, info, listing, health, error = asyncio.run(scenario())
    assert [u.to_json_dict() for u in unary] == [e.to_json_dict() for e in expected]
    np.testing.assert_allclose(
        [c[0].score for c in concurrent], [e.score for e in expected], atol=1e-9
    )
    assert [[item.id for item in batch] for batch in streamed] == [
        ["a0", "b", "c"],
        ["a3", "b", "c"],
        ["a6", "b", "c"],
    ]
    assert info.label == "demo@1" and [i.label for i in listing] == ["demo@1"]
    assert health == "SERVING"
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert "no active index is named 'missing'" in error.details
