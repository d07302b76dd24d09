"""One client cannot starve the others: huge batches are scored in micro-batches that take
turns with other requests (round-robin), images are decoded and encoded in turns, and the
reassembled responses equal unsplit scoring."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bliss.client import BlissClient
from bliss.scorer import Scorer
from bliss.server.encode_batcher import EncodeBatcher
from bliss.server.fair_scheduler import FairScheduler
from bliss.server.micro_batches import ScoredPart, merge_parts, row_slices
from bliss.server.runtime import BackgroundServer
from bliss.server.status_codes import NonFiniteScoreError
from bliss.v1 import scorer_pb2
from tests.serving_fixtures import build_from_embeddings, server_settings
from tests.synthetic_embeddings import synthetic_world

SECONDS_PER_ROW = 0.005  # the scoring slow-down of the starvation test


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=4, entries=300, per_class=10, tests=4, seed=41)


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("fairness")
    build_from_embeddings(world, root / "bundle", root / "data")
    return root / "data"


def queries(world, count: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = world.test[rng.integers(0, len(world.test), count)]
    return (rows + rng.normal(scale=0.3, size=rows.shape)).astype(np.float32)


def test_micro_batched_responses_equal_unsplit_scoring(world, data):
    vectors = queries(world, 203)
    ids = [f"item-{i}" for i in range(len(vectors))]
    answers = {}
    for micro_batch in (0, 7, 64):  # 0: unsplit; 7 does not divide 203
        settings = server_settings(data, micro_batch_items=micro_batch)
        with BackgroundServer(settings) as server, BlissClient(server.address) as client:
            items = client.score(embeddings=vectors, ids=ids, k=9, class_scores=True)
            answers[micro_batch] = [item.to_json_dict() for item in items]
    assert [item["id"] for item in answers[7]] == ids
    assert answers[7] == answers[0]
    assert answers[64] == answers[0]


def test_row_slices_cover_the_batch_in_order():
    assert row_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert row_slices(5, 0) == [slice(0, 5)]
    assert row_slices(4, 8) == [slice(0, 4)]


def test_non_finite_rows_of_every_part_are_named_in_request_order():
    fine = ScoredPart(scorer_pb2.ScoreResponse(), [])
    parts = [fine, ScoredPart(None, [3]), fine, ScoredPart(None, [7, 8])]
    with pytest.raises(NonFiniteScoreError) as caught:
        merge_parts(parts, [f"x{i}" for i in range(10)], "demo@1")
    assert str(caught.value).startswith(
        "item 3 (id 'x3'), item 7 (id 'x7'), item 8 (id 'x8'): index demo@1 produced a NaN"
    )


def test_lanes_take_turns_one_task_each():
    async def scenario() -> list[str]:
        order: list[str] = []
        gate = threading.Event()

        def task(name: str) -> None:
            if name == "big-0":
                gate.wait(10)  # hold the only slot until the small request is queued
            order.append(name)

        with ThreadPoolExecutor(1) as pool:
            scheduler = FairScheduler(pool, slots=1)
            with scheduler.lane() as big, scheduler.lane() as small:
                big_calls = [scheduler.run(big, task, f"big-{i}") for i in range(4)]
                running = asyncio.gather(*big_calls)
                while len(big.tasks) < 3:  # big-0 runs, three wait
                    await asyncio.sleep(0.001)
                small_call = asyncio.ensure_future(scheduler.run(small, task, "small"))
                while not small.tasks:
                    await asyncio.sleep(0.001)
                gate.set()
                await asyncio.gather(running, small_call)
        return order

    assert asyncio.run(scenario()) == ["big-0", "small", "big-1", "big-2", "big-3"]


def test_a_failed_request_drops_its_queued_tasks():
    async def scenario() -> list[int]:
        done: list[int] = []
        closed = threading.Event()

        def task(number: int) -> None:
            if number == 0:
                raise ValueError("broken")
            if number == 1:  # handed to the pool as the failure came back: holds the slot
                closed.wait(10)
            done.append(number)

        with ThreadPoolExecutor(1) as pool:
            scheduler = FairScheduler(pool, slots=1)
            with pytest.raises(ValueError), scheduler.lane() as lane:
                await asyncio.gather(*(scheduler.run(lane, task, n) for n in range(5)))
            closed.set()
            await asyncio.sleep(0.2)
        return done

    # Tasks 2 to 4 were still queued when the request failed: they never run.
    assert asyncio.run(scenario()) in ([], [1])


def test_the_encoder_takes_images_from_every_waiting_request_in_turn():
    async def scenario() -> list[list[float]]:
        import torch

        batches: list[list[float]] = []
        gate = threading.Event()

        def encode(pixels: torch.Tensor) -> np.ndarray:
            if not batches:
                gate.wait(10)  # the first batch runs until both requests are queued
            batches.append(pixels[:, 0, 0, 0].tolist())
            return np.zeros((len(pixels), 2), dtype=np.float32)

        batcher = EncodeBatcher(encode, name="test", max_batch=4, max_delay_s=0)
        try:
            big = asyncio.ensure_future(batcher.encode([torch.full((3, 1, 1), 1.0)] * 12))
            while sum(map(len, batcher._turns)) != 8:  # 4 of big's images are encoding
                await asyncio.sleep(0.001)
            small = asyncio.ensure_future(batcher.encode([torch.full((3, 1, 1), 2.0)] * 2))
            while len(batcher._turns) < 2:
                await asyncio.sleep(0.001)
            gate.set()
            await asyncio.gather(big, small)
        finally:
            await batcher.close()
        return batches

    batches = asyncio.run(scenario())
    assert batches[0] == [1.0] * 4
    # The next batch alternates: the small request's images do not wait for big's 8 others.
    assert sorted(batches[1]) == [1.0, 1.0, 2.0, 2.0]
    assert sum(len(b) for b in batches) == 14


@pytest.mark.parametrize("micro_batch", [16, 0])
def test_a_small_request_is_not_held_back_by_a_huge_one(world, data, monkeypatch, micro_batch):
    """Scoring slowed to SECONDS_PER_ROW: a 200-row request takes about a second, in one
    piece (micro-batching off) or in 13 turns; a 2-row request sent while it runs finishes
    first only when the huge one is split."""
    original = Scorer.score
    started = threading.Event()

    def slow(self, embeddings, **kwargs):
        started.set()
        time.sleep(SECONDS_PER_ROW * len(embeddings))
        return original(self, embeddings, **kwargs)

    monkeypatch.setattr(Scorer, "score", slow)
    huge, small = queries(world, 200), queries(world, 2, seed=4)
    finished: dict[str, float] = {}
    settings = server_settings(data, micro_batch_items=micro_batch, scoring_threads=1)
    with BackgroundServer(settings) as server, BlissClient(server.address) as client:

        def score_huge() -> None:
            client.score(embeddings=huge, top_entries=False)
            finished["huge"] = time.monotonic()

        thread = threading.Thread(target=score_huge)
        thread.start()
        assert started.wait(30)
        sent = time.monotonic()
        client.score(embeddings=small, top_entries=False)
        finished["small"] = time.monotonic()
        thread.join(60)
    if micro_batch:
        assert finished["small"] < finished["huge"]
        # It waited for about one micro-batch (0.08 s of sleep), not the huge request.
        assert finished["small"] - sent < SECONDS_PER_ROW * len(huge) / 2
    else:
        assert finished["small"] > finished["huge"]  # first come, first served
