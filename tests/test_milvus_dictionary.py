"""A dictionary held in Milvus (milvus-lite here) scores as the same inputs in a FAISS file."""

from __future__ import annotations

import shutil
import signal
import subprocess
from typing import NamedTuple

import numpy as np
import pytest

from bliss.errors import StoreError
from bliss.milvus_dictionary import MilvusClients, MilvusDictionaryOptions
from bliss.store import Store
from bliss.version_check import verify_version
from bliss.version_loader import load_scorer
from tests.cli_runner import run_cli
from tests.synthetic_embeddings import synthetic_world
from tests.test_indexer_embeddings import bundle_from

pytest.importorskip("milvus_lite", reason="milvus-lite is pinned in the dev extra")


@pytest.fixture(autouse=True)
def release_milvus_lite():
    """milvus-lite serves one process, and one client of it: release it after each test."""
    yield
    MilvusClients.close_all()


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=3, entries=700, per_class=25, tests=40, seed=8)


def build(bundle, data, name, *extra, store_url=None):
    result = run_cli(
        "index", "build", "--name", name, "--from-embeddings", bundle, "--default-k", "7",
        "--calibration-fraction", "0.2", *extra, data_dir=data, store_url=store_url,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    return result


def scorers(data, store_url, *names):
    with Store.open(store_url) as store:
        return [load_scorer(store, store.get_version(name, 1), data) for name in names]


@pytest.mark.parametrize("mode", ["moments", "table"])
def test_milvus_flat_scores_like_a_faiss_flat_file(world, tmp_path, mode, store_url):
    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    lite = tmp_path / "dictionaries.db"
    build(bundle, data, "faiss", "--statistics-mode", mode, store_url=store_url)
    built = build(
        bundle, data, "milvus", "--statistics-mode", mode, "--dictionary-store", f"milvus:{lite}",
        store_url=store_url,
    )  # fmt: skip
    assert "milvus collection" in built.stdout
    url = store_url or f"sqlite:///{data / 'bliss.sqlite3'}"
    faiss_scorer, milvus_scorer = scorers(data, url, "faiss", "milvus")
    for k in (1, 7, 30):
        expected = faiss_scorer.score(world.test, k=k)
        got = milvus_scorer.score(world.test, k=k)
        np.testing.assert_array_equal(got.top_entry_ids, expected.top_entry_ids)
        np.testing.assert_allclose(got.score, expected.score, rtol=1e-6, atol=0)
    queries = world.test.astype(np.float64)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    faiss_hits, milvus_hits = (
        faiss_scorer.index.search(queries, 7),
        milvus_scorer.index.search(queries, 7),
    )
    np.testing.assert_array_equal(milvus_hits[1], faiss_hits[1])
    np.testing.assert_array_equal(milvus_hits[0], faiss_hits[0])  # both exact float64
    ids = expected.top_entry_ids[:3]
    assert milvus_scorer.entry_texts(ids) == faiss_scorer.entry_texts(ids)
    with Store.open(url) as store:
        version = store.get_version("milvus", 1)
        assert version.dictionary_store == "milvus"
        assert store.count_entries(version.id) == 0  # texts and vectors live in Milvus
        assert store.load_calibration(version.id) is not None
        checked = verify_version(store, version, data)
        assert checked.sampled_entries == 700


def test_milvus_is_the_default_moments_store_and_refuses_faiss_options(world, tmp_path):
    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    store = f"milvus:{tmp_path / 'm.db'}"
    refused = run_cli(
        "index", "build", "--name", "m", "--from-embeddings", bundle, "--dictionary-store",
        store, "--index-kind", "ivf", data_dir=data,
    )  # fmt: skip
    assert refused.code == 2 and "--index-kind applies to FAISS indexes" in refused.stderr
    bad_json = run_cli(
        "index", "build", "--name", "m", "--from-embeddings", bundle, "--dictionary-store",
        store, "--milvus-search-params", "{nprobe", data_dir=data,
    )  # fmt: skip
    assert bad_json.code == 2 and "--milvus-search-params is not valid JSON" in bad_json.stderr
    built = build(bundle, data, "m", "--dictionary-store", store, "--milvus-index-type", "HNSW",
                  "--milvus-index-params", '{"M": 8, "efConstruction": 64}',
                  "--milvus-search-params", '{"ef": 64}')  # fmt: skip
    assert "moments statistics" in built.stdout
    again = build(bundle, data, "m", "--dictionary-store", store)
    assert "unchanged" not in again.stdout  # another index type is another build
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as opened:
        versions = opened.list_versions("m")
        options = [MilvusDictionaryOptions.from_json(v.dictionary_options) for v in versions]
    assert [o.index_type for o in options] == ["HNSW", "FLAT"]
    assert options[0].search_params == {"ef": 64}
    assert options[0].collection != options[1].collection


def test_an_unreachable_milvus_is_one_line(world, tmp_path):
    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    lite = tmp_path / "gone.db"
    build(bundle, data, "m", "--dictionary-store", f"milvus:{lite}", "--activate")
    MilvusClients.close_all()
    shutil.rmtree(lite)
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        version = store.get_version("m")
        with pytest.raises(StoreError, match=r"does not exist|cannot open Milvus"):
            load_scorer(store, version, data)


def test_a_bliss_server_scores_a_milvus_version_like_local_faiss(world, tmp_path):
    """A real `bliss serve` process searches the collection; one scoring path for both."""
    from bliss.client import BlissClient
    from tests.test_server_process import start_serving

    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    build(bundle, data, "faiss", "--activate")
    build(bundle, data, "milvus", "--dictionary-store", f"milvus:{tmp_path / 'm.db'}", "--activate")
    url = f"sqlite:///{data / 'bliss.sqlite3'}"
    (faiss_scorer,) = scorers(data, url, "faiss")
    MilvusClients.close_all()  # milvus-lite serves one process: hand the file to the server
    process, port, _ = start_serving(data)
    try:
        with BlissClient(f"127.0.0.1:{port}") as client:
            items = client.score(embeddings=world.test, index="milvus", k=7, top_entries=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    expected = faiss_scorer.score(world.test, k=7)
    np.testing.assert_allclose([item.score for item in items], expected.score, rtol=1e-6)
    assert [item.top_entries[0].text for item in items] == [
        texts[0] for texts in faiss_scorer.entry_texts(expected.top_entry_ids)
    ]


class MilvusServer(NamedTuple):
    uri: str
    process: subprocess.Popen


@pytest.fixture
def milvus_server(tmp_path):
    """A Milvus server process (milvus-lite's gRPC server): what clusters look like to bliss."""
    import socket
    import sys
    import time

    from pymilvus import MilvusClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            MilvusClient(uri=uri, timeout=2).close()
            break
        except Exception:
            assert process.poll() is None and time.monotonic() < deadline, "no Milvus server"
            time.sleep(0.2)
    yield MilvusServer(uri, process)
    process.send_signal(signal.SIGCONT)
    process.terminate()
    process.wait(timeout=30)


def test_stateless_servers_share_one_milvus(world, tmp_path, milvus_server):
    from bliss.client import BlissClient
    from tests.test_server_process import start_serving

    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    build(bundle, data, "faiss", "--activate")
    build(bundle, data, "m", "--dictionary-store", f"milvus:{milvus_server.uri}", "--activate")
    (faiss_scorer,) = scorers(data, f"sqlite:///{data / 'bliss.sqlite3'}", "faiss")
    expected = faiss_scorer.score(world.test, k=7).score
    servers = [start_serving(data) for _ in range(2)]
    try:
        for _, port, _ in servers:
            with BlissClient(f"127.0.0.1:{port}") as client:
                items = client.score(embeddings=world.test, index="m", k=7)
            np.testing.assert_allclose([item.score for item in items], expected, rtol=1e-6)
    finally:
        for process, _, _ in servers:
            process.terminate()
            process.wait(timeout=60)


@pytest.mark.slow
def test_ray_workers_fill_a_milvus_server_in_parallel(world, tmp_path, milvus_server, caplog):
    pytest.importorskip("ray")
    from bliss.indexer import milvus_build
    from bliss.indexer.ray_cluster import stop_local_cluster

    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    small_blocks = pytest.MonkeyPatch.context()
    with small_blocks as patch:
        patch.setattr(milvus_build, "INSERT_BATCH", 100)  # 7 blocks: several tasks
        try:
            build(bundle, data, "m", "--dictionary-store", f"milvus:{milvus_server.uri}",
                  "--backend", "ray", "--ray-encoders", "1")  # fmt: skip
        finally:
            stop_local_cluster()
    build(bundle, data, "faiss")
    faiss_scorer, milvus_scorer = scorers(data, f"sqlite:///{data / 'bliss.sqlite3'}", "faiss", "m")
    np.testing.assert_allclose(
        milvus_scorer.score(world.test, k=7).score, faiss_scorer.score(world.test, k=7).score,
        rtol=1e-6,
    )  # fmt: skip


def test_deleting_a_version_drops_its_collection(world, tmp_path):
    from pymilvus import MilvusClient

    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    lite = tmp_path / "m.db"
    build(bundle, data, "m", "--dictionary-store", f"milvus:{lite}")
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        options = MilvusDictionaryOptions.from_json(store.get_version("m", 1).dictionary_options)
    deleted = run_cli("index", "delete", "m@1", data_dir=data)
    assert deleted.code == 0, deleted.stderr
    MilvusClients.close_all()
    client = MilvusClient(str(lite))
    try:
        assert options.collection not in client.list_collections()
    finally:
        client.close()


def test_health_follows_milvus_down_and_back(world, tmp_path, milvus_server):
    """Milvus unreachable: NOT_SERVING and UNAVAILABLE; back: SERVING, without a restart."""
    import grpc

    from bliss.client import BlissClient, ScoringServiceError
    from tests.serving_fixtures import wait_for_health
    from tests.test_server_process import start_serving

    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    build(bundle, data, "m", "--dictionary-store", f"milvus:{milvus_server.uri}", "--activate")
    process, port, _ = start_serving(data, "--health-check-interval-s", "0.3")
    milvus = milvus_server.process
    try:
        with BlissClient(f"127.0.0.1:{port}") as client:
            assert len(client.score(embeddings=world.test[:2], index="m")) == 2
            milvus.send_signal(signal.SIGSTOP)  # unreachable: it no longer answers
            try:
                wait_for_health(client, "m", "NOT_SERVING")
                with pytest.raises(ScoringServiceError) as refused:
                    client.score(embeddings=world.test[:2], index="m")
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert "the Milvus collection of m@1 cannot be searched" in str(refused.value)
            finally:
                milvus.send_signal(signal.SIGCONT)
            wait_for_health(client, "m", "SERVING")
            assert len(client.score(embeddings=world.test[:2], index="m")) == 2
    finally:
        process.terminate()
        process.wait(timeout=60)
