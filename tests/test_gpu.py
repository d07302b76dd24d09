"""GPU placement of dictionary indexes and fp16 encoding.

The unmarked tests run everywhere: they fake the absence (or presence) of faiss GPU
support to check the CPU fallbacks. The ``gpu`` tests compare GPU results with the CPU
ones; the default run deselects them (pyproject addopts), ``pytest -m gpu`` selects them,
and they skip with the reason where CUDA or faiss-gpu is missing.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

from bliss.dictionary_index import DictionaryIndex, IndexKind, IndexOptions, build_index
from bliss.gpu_index import (
    GPU_MAX_K,
    GpuOptions,
    GpuSearchIndex,
    gpu_count,
    ivf_flat_to_float16,
    place_on_gpus,
)
from bliss.server.settings import ServerSettings
from tests.synthetic_embeddings import synthetic_world, unit_rows

DIM = 64
K = 10


def _faiss_gpu_skip_reason() -> str:
    if not hasattr(faiss, "StandardGpuResources"):
        return "faiss has no GPU support (faiss-cpu wheel): install faiss-gpu as the README says"
    return "faiss sees no GPU"


needs_faiss_gpu = pytest.mark.skipif(gpu_count() == 0, reason=_faiss_gpu_skip_reason())
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")


def unit_vectors(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit_rows(rng.normal(size=(rows, DIM))).astype(np.float32)


@pytest.fixture(scope="module")
def dictionary() -> np.ndarray:
    return unit_vectors(20_000, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return unit_vectors(64, seed=2)


@pytest.fixture(scope="module")
def ivfpq(dictionary) -> DictionaryIndex:
    """Built once: training the product quantizer takes seconds."""
    options = IndexOptions(kind=IndexKind.IVFPQ, nlist=32, nprobe=32, pq_m=8)
    return build_index(dictionary, options)


@pytest.fixture
def no_faiss_gpu_support(monkeypatch):
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)


@pytest.fixture
def fake_faiss_gpu(monkeypatch):
    """faiss claims GPU support and one GPU, so the code past those checks runs."""
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)


def exhaustive_ivf(embeddings: np.ndarray) -> DictionaryIndex:
    """An IVF index that probes all its lists: the same answers as flat, up to rounding."""
    return build_index(embeddings, IndexOptions(kind=IndexKind.IVF, nlist=32, nprobe=32))


def recall(found: np.ndarray, expected: np.ndarray) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found, expected, strict=True))
    return hits / expected.size


# --- CPU fallbacks: run in the default suite ---------------------------------------------


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.IVF])
@pytest.mark.parametrize("float16", [False, True])
def test_without_faiss_gpu_support_the_index_stays(no_faiss_gpu_support, caplog, kind, float16):
    index = build_index(unit_vectors(500, seed=3), IndexOptions(kind=kind, nlist=4))
    with caplog.at_level(logging.INFO, logger="bliss.gpu_index"):
        placed = index.to_gpus(GpuOptions(float16=float16))
    assert placed is index
    assert "stays on the CPU: this faiss has no GPU support" in caplog.text


def test_without_a_visible_gpu_the_index_stays(monkeypatch, caplog):
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    index = build_index(unit_vectors(100, seed=3))
    with caplog.at_level(logging.INFO, logger="bliss.gpu_index"):
        assert place_on_gpus(index.index) is index.index
    assert "faiss sees no GPU" in caplog.text


def test_hnsw_stays_on_the_cpu(fake_faiss_gpu, caplog):
    index = build_index(unit_vectors(300, seed=3), IndexOptions(kind=IndexKind.HNSW))
    with caplog.at_level(logging.INFO, logger="bliss.gpu_index"):
        assert index.to_gpus() is index
    assert "HNSW has no GPU implementation" in caplog.text


class _Options:
    """Stands in for faiss.GpuMultipleClonerOptions where faiss has no GPU support."""


def test_a_failed_copy_to_the_gpus_keeps_the_cpu_index(fake_faiss_gpu, monkeypatch, caplog):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("Error in GpuIndexFlat: out of memory\nC++ stack ...")

    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: _Options(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", out_of_memory)
    index = build_index(unit_vectors(100, seed=3))
    with caplog.at_level(logging.WARNING, logger="bliss.gpu_index"):
        assert index.to_gpus(GpuOptions(float16=True)) is index
    assert "copying it to the GPUs failed (Error in GpuIndexFlat: out of memory)" in caplog.text


def test_float16_ivf_keeps_lists_ids_and_answers():
    vectors = unit_vectors(3000, seed=4)
    ivf = exhaustive_ivf(vectors).index
    half = ivf_flat_to_float16(ivf)
    assert half.ntotal == ivf.ntotal and half.nprobe == ivf.nprobe
    for list_no in range(ivf.nlist):
        assert half.invlists.list_size(list_no) == ivf.invlists.list_size(list_no)
    queries = unit_vectors(32, seed=5)
    similarities, ids = ivf.search(queries, K)
    half_similarities, half_ids = half.search(queries, K)
    assert recall(half_ids, ids) >= 0.95
    np.testing.assert_allclose(half_similarities, similarities, atol=2e-3)


def test_gpu_search_index_rescores_from_the_cpu_vectors():
    """The GPU side only picks candidates: reported similarities are the exact ones."""
    vectors = unit_vectors(3000, seed=4)
    cpu = exhaustive_ivf(vectors)
    stand_in = GpuSearchIndex(ivf_flat_to_float16(cpu.index), cpu.index, gpus=1)
    placed = DictionaryIndex(stand_in, IndexKind.IVF)
    queries = unit_vectors(32, seed=5)
    similarities, ids = placed.search(queries, K)
    exact = np.einsum("bd,bkd->bk", queries.astype(np.float64), vectors[ids].astype(np.float64))
    np.testing.assert_allclose(similarities, exact, rtol=0, atol=1e-12)
    assert recall(ids, cpu.search(queries, K)[1]) >= 0.95


def test_k_beyond_the_gpu_limit_is_searched_on_the_cpu():
    class NoSearch:
        def search(self, queries, k):
            raise AssertionError(f"k={k} must not reach the GPU")

    cpu = build_index(unit_vectors(GPU_MAX_K + 100, seed=6))
    placed = DictionaryIndex(GpuSearchIndex(NoSearch(), cpu.index, gpus=1), IndexKind.FLAT)
    queries = unit_vectors(2, seed=7)
    expected = cpu.search(queries, GPU_MAX_K + 1)
    found = placed.search(queries, GPU_MAX_K + 1)
    np.testing.assert_array_equal(found[1], expected[1])


def test_float16_setting_reads_its_variable(monkeypatch, tmp_path):
    assert ServerSettings(data_dir=tmp_path).faiss_gpu_float16 is False
    monkeypatch.setenv("BLISS_FAISS_GPU_FLOAT16", "1")
    assert ServerSettings(data_dir=tmp_path).faiss_gpu_float16 is True


# --- On GPUs: pytest -m gpu ---------------------------------------------------------------


@pytest.mark.gpu
@needs_faiss_gpu
@pytest.mark.parametrize("float16", [False, True])
@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.IVF])
def test_gpu_search_matches_the_cpu(dictionary, queries, kind, float16):
    cpu = exhaustive_ivf(dictionary) if kind is IndexKind.IVF else build_index(dictionary)
    gpu = cpu.to_gpus(GpuOptions(float16=float16))
    assert isinstance(gpu.index, GpuSearchIndex)
    cpu_similarities, cpu_ids = cpu.search(queries, K)
    gpu_similarities, gpu_ids = gpu.search(queries, K)
    # float16 storage may swap near ties; the similarities reported are exact either way.
    assert recall(gpu_ids, cpu_ids) >= (0.95 if float16 else 0.99)
    np.testing.assert_allclose(gpu_similarities, cpu_similarities, atol=2e-3 if float16 else 1e-6)


@pytest.mark.gpu
@needs_faiss_gpu
@pytest.mark.parametrize("float16", [False, True])
def test_ivfpq_is_searched_on_the_gpu(ivfpq, queries, float16):
    gpu = ivfpq.to_gpus(GpuOptions(float16=float16))
    assert isinstance(gpu.index, GpuSearchIndex)
    assert recall(gpu.search(queries, K)[1], ivfpq.search(queries, K)[1]) >= 0.9


@pytest.mark.gpu
@needs_faiss_gpu
@pytest.mark.parametrize("shard", [True, False])
def test_every_visible_gpu_is_used(dictionary, queries, shard):
    cpu = build_index(dictionary)
    gpu = cpu.to_gpus(GpuOptions(shard=shard))
    assert gpu.index.gpus == gpu_count()
    expected_similarities, expected_ids = cpu.search(queries, K)
    similarities, ids = gpu.search(queries, K)
    assert recall(ids, expected_ids) >= 0.99
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-6)


@pytest.mark.gpu
@needs_faiss_gpu
def test_hnsw_stays_on_the_cpu_beside_gpus(dictionary):
    index = build_index(dictionary[:2000], IndexOptions(kind=IndexKind.HNSW))
    assert index.to_gpus() is index


@pytest.mark.gpu
@needs_cuda
def test_fp16_encoding_matches_fp32():
    from bliss.encoders import TINY_TEST_MODEL, ClipEncoder, ModelSpec

    spec = ModelSpec(TINY_TEST_MODEL)
    full = ClipEncoder.load(spec, device="cuda", precision="fp32")
    half = ClipEncoder.load(spec, device="cuda", precision="fp16")
    pixels = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    full_images, half_images = full.encode_image_batch(pixels), half.encode_image_batch(pixels)
    assert half_images.dtype == np.float32
    np.testing.assert_allclose(half_images, full_images, atol=1e-2)
    assert np.einsum("bd,bd->b", half_images, full_images).min() > 0.999
    texts = ["a photo of a tench", "a dog on a skateboard"]
    np.testing.assert_allclose(half.encode_texts(texts), full.encode_texts(texts), atol=1e-2)


@pytest.mark.gpu
@needs_faiss_gpu
def test_a_scorer_loaded_on_gpus_scores_like_the_cpu(tmp_path):
    from bliss.settings import StoreSettings
    from bliss.store import Store
    from bliss.version_loader import load_scorer
    from tests.cli_runner import run_cli
    from tests.test_indexer_embeddings import bundle_from

    world = synthetic_world(classes=4, entries=3000, per_class=20, tests=64)
    data_dir = tmp_path / "data"
    bundle = bundle_from(world, tmp_path / "bundle")
    built = run_cli("index", "build", "--name", "demo", "--from-embeddings", bundle,
                    "--activate", data_dir=data_dir)  # fmt: skip
    assert built.code == 0, built.stderr
    with Store.open(StoreSettings(data_dir=data_dir).resolved_store_url) as store:
        version = store.get_version("demo")
        cpu = load_scorer(store, version, data_dir)
        gpu = load_scorer(store, version, data_dir, use_gpu=True)
        assert isinstance(gpu.index.index, GpuSearchIndex)
        expected, found = cpu.score(world.test), gpu.score(world.test)
    np.testing.assert_array_equal(found.top_entry_ids, expected.top_entry_ids)
    np.testing.assert_allclose(found.score, expected.score, rtol=1e-9, atol=1e-12)
