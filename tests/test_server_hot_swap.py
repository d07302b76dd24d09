"""Hot swap under load: a newly activated version takes over with zero failed calls."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bliss.client import BlissClient
from bliss.server import index_registry
from bliss.server.runtime import BackgroundServer
from bliss.store import Store
from tests.serving_fixtures import activate, build_from_embeddings, local_lines, server_settings
from tests.synthetic_embeddings import synthetic_world

POLL_S = 0.1


class ScoringLoad:
    """Client threads scoring the same batch back to back, recording what answered."""

    def __init__(self, address: str, embeddings: np.ndarray, threads: int = 3) -> None:
        self.embeddings = embeddings
        self.answers: list[list[tuple[str, list[float]]]] = [[] for _ in range(threads)]
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._client = BlissClient(address, timeout_s=30)
        self._threads = [
            threading.Thread(target=self._run, args=(answers,)) for answers in self.answers
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, answers: list[tuple[str, list[float]]]) -> None:
        while not self._stop.is_set():
            try:
                items = self._client.score(embeddings=self.embeddings, top_entries=False)
            except BaseException as error:  # counted, and the load goes on
                self.failures.append(error)
                continue
            labels = {item.index_version for item in items}
            assert len(labels) == 1  # one batch, one version
            answers.append((labels.pop(), [item.score for item in items]))

    def wait_until(self, condition, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(condition(answers) for answers in self.answers):
            assert time.monotonic() < deadline, "the load never got there"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._client.close()


def seen(label: str, count: int = 3):
    return lambda answers: sum(1 for answered, _ in answers if answered == label) >= count


def labels_in_order(answers) -> list[str]:
    """The versions that answered, each run of repeats collapsed."""
    runs: list[str] = []
    for label, _ in answers:
        if not runs or runs[-1] != label:
            runs.append(label)
    return runs


@pytest.fixture
def two_versions(tmp_path):
    """demo@1 active, demo@2 ready (other statistics, same dimension), and test vectors."""
    data = tmp_path / "data"
    first = synthetic_world(classes=3, entries=200, per_class=20, tests=8, seed=1)
    second = synthetic_world(classes=3, entries=200, per_class=20, tests=8, seed=2)
    build_from_embeddings(first, tmp_path / "b1", data)
    build_from_embeddings(second, tmp_path / "b2", data, activate=False)
    np.save(tmp_path / "test.npy", first.test)
    return data, first.test, tmp_path / "test.npy"


def served(server: BackgroundServer, name: str):
    async def resolve():
        return server.server.registry.resolve(name)

    return server.call(resolve())


def test_activating_a_version_under_load_fails_no_call(two_versions):
    data, vectors, vectors_file = two_versions
    with BackgroundServer(server_settings(data, poll_interval_s=POLL_S)) as server:
        old = served(server, "demo")
        load = ScoringLoad(server.address, vectors)
        try:
            load.wait_until(seen("demo@1"))
            activate("demo", 2, data)
            load.wait_until(seen("demo@2"))
            activate("demo", 1, data)  # and a rollback to the retired version
            load.wait_until(lambda answers: labels_in_order(answers)[-1:] == ["demo@1"])
            load.wait_until(seen("demo@1", 6))
        finally:
            load.stop()
        assert load.failures == []
        for answers in load.answers:
            assert labels_in_order(answers) == ["demo@1", "demo@2", "demo@1"]
        # Each version's answers are its own scores, exactly what --local gives for it.
        local_v1 = [
            line["score"]
            for line in local_lines(data, None, "--index", "demo", "--embeddings", vectors_file)
        ]
        v1_scores = {tuple(scores) for label, scores in load.answers[0] if label == "demo@1"}
        v2_scores = {tuple(scores) for label, scores in load.answers[0] if label == "demo@2"}
        assert len(v1_scores) == len(v2_scores) == 1
        np.testing.assert_allclose(v1_scores.pop(), local_v1, atol=1e-12)
        assert not np.allclose(v2_scores.pop(), local_v1)
        # The first demo@1 object was released once its calls were done; a new one serves.
        assert old.released and old.in_flight == 0
        assert served(server, "demo") is not old


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(two_versions, monkeypatch, caplog):
    data, vectors, _ = two_versions
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        faiss_file = data / store.get_version("demo", 2).faiss_path
    hidden = Path(f"{faiss_file}.hidden")
    faiss_file.rename(hidden)
    monkeypatch.setattr(index_registry, "RETRY_FAILED_LOAD_S", 0.0)
    with BackgroundServer(server_settings(data, poll_interval_s=POLL_S)) as server:
        load = ScoringLoad(server.address, vectors, threads=2)
        try:
            load.wait_until(seen("demo@1"))
            # `bliss index activate` would refuse (it verifies the files): the file goes
            # missing after activation, as far as the server can tell.
            with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
                store.activate(store.get_version("demo", 2).id)
            deadline = time.monotonic() + 30
            metrics = server.server.metrics.registry
            while not metrics.get_sample_value(
                "bliss_index_loads_total", {"index": "demo", "outcome": "failed"}
            ):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with BlissClient(server.address) as client:
                assert client.health("demo") == "SERVING"  # demo@1 still serves
            load.wait_until(seen("demo@1", 6))
            assert all(labels_in_order(a) == ["demo@1"] for a in load.answers)
            hidden.rename(faiss_file)  # the operator restores the file: the retry loads it
            load.wait_until(seen("demo@2"))
        finally:
            load.stop()
        assert load.failures == []
        assert "v2.faiss is missing" in caplog.text
