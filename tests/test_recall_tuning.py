"""Recall tuning: nprobe / efSearch raised to the smallest value that reaches a target.

The data are clustered unit vectors with a shared offset on the queries (CLIP's modality
gap in miniature): HNSW's default efSearch misses the target there, so tuning has to
raise it, and IVF needs several lists.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from bliss.dictionary_index import DictionaryIndex, IndexKind, IndexOptions, build_index
from bliss.errors import InvalidInputError
from bliss.npy_files import NpyRows
from bliss.recall_tuning import (
    default_nlist,
    exact_neighbours,
    recall_at_k,
    sample_queries,
    search_parameter,
    tune_search,
)

ENTRIES = 20_000
DIM = 64
CLUSTERS = 100
K = 10
TARGET = 0.95


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries [20k, 64], queries [1000, 64] near the clusters, exact top-K ids."""
    rng = np.random.default_rng(0)
    centres = unit_rows(rng.normal(size=(CLUSTERS, DIM)))
    noise = 0.7 / math.sqrt(DIM)
    entries = unit_rows(
        centres[rng.integers(0, CLUSTERS, ENTRIES)] + noise * rng.normal(size=(ENTRIES, DIM))
    )
    gap = 2.5 * unit_rows(rng.normal(size=(1, DIM)))
    queries = unit_rows(
        centres[rng.integers(0, CLUSTERS, 1000)] + gap + noise * rng.normal(size=(1000, DIM))
    )
    return entries, queries, exact_neighbours(entries, queries, K)


@pytest.fixture(scope="module")
def indexes(world: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[IndexKind, DictionaryIndex]:
    entries = world[0]
    nlist = default_nlist(ENTRIES)
    return {
        kind: build_index(entries, IndexOptions(kind=kind, nlist=nlist))
        for kind in (IndexKind.IVF, IndexKind.HNSW, IndexKind.IVFPQ)
    }


def measured_recall(index: DictionaryIndex, world: tuple[np.ndarray, ...]) -> float:
    _, queries, exact = world
    return recall_at_k(index.search(queries, K)[1], exact)


def set_parameter(index: DictionaryIndex, value: int) -> None:
    """Set directly through faiss, independently of the module under test."""
    if index.kind is IndexKind.HNSW:
        index.index.hnsw.efSearch = value
    else:
        faiss.extract_index_ivf(index.index).nprobe = value


def current_parameter(index: DictionaryIndex) -> int:
    if index.kind is IndexKind.HNSW:
        return int(index.index.hnsw.efSearch)
    return int(faiss.extract_index_ivf(index.index).nprobe)


@pytest.mark.parametrize("kind", [IndexKind.IVF, IndexKind.HNSW])
def test_tuning_reaches_the_target_with_the_smallest_value(kind, world, indexes):
    index = indexes[kind]
    _, queries, exact = world
    tuning = tune_search(index.index, kind, queries, exact, K, TARGET)
    assert tuning.reached
    assert tuning.parameter == ("efSearch" if kind is IndexKind.HNSW else "nprobe")
    assert current_parameter(index) == tuning.value
    assert measured_recall(index, world) == pytest.approx(tuning.recall)
    assert tuning.recall >= TARGET
    lowest = K if kind is IndexKind.HNSW else 1
    assert tuning.value > lowest  # the data make the lowest value miss the target
    set_parameter(index, tuning.value - 1)
    assert measured_recall(index, world) < TARGET
    set_parameter(index, tuning.value)


def test_hnsw_default_ef_search_misses_the_target(world, indexes):
    """The reason for the option: defaults can fall short on gap-shifted queries."""
    index = indexes[IndexKind.HNSW]
    set_parameter(index, IndexOptions().ef_search)
    assert measured_recall(index, world) < TARGET


def test_ivfpq_reaches_a_target_below_its_quantisation_cap(world, indexes):
    index = indexes[IndexKind.IVFPQ]
    _, queries, exact = world
    set_parameter(index, default_nlist(ENTRIES))
    cap = measured_recall(index, world)
    target = 0.9 * cap
    tuning = tune_search(index.index, IndexKind.IVFPQ, queries, exact, K, target)
    assert tuning.reached
    assert current_parameter(index) == tuning.value
    assert measured_recall(index, world) == pytest.approx(tuning.recall)
    assert tuning.recall >= target
    if tuning.value > 1:
        set_parameter(index, tuning.value - 1)
        assert measured_recall(index, world) < target


def test_unreachable_target_reports_the_best_recall(world, indexes):
    index = indexes[IndexKind.IVFPQ]
    _, queries, exact = world
    set_parameter(index, default_nlist(ENTRIES))
    recall_at_all_lists = measured_recall(index, world)
    assert recall_at_all_lists < TARGET  # PQ codes of 8 bytes cap recall
    tuning = tune_search(index.index, IndexKind.IVFPQ, queries, exact, K, TARGET)
    assert not tuning.reached
    assert tuning.target == TARGET
    assert current_parameter(index) == tuning.value
    assert measured_recall(index, world) == pytest.approx(tuning.recall)
    assert tuning.recall >= recall_at_all_lists


def test_flat_needs_no_tuning(world):
    entries, queries, exact = world
    index = build_index(entries)
    tuning = tune_search(index.index, IndexKind.FLAT, queries, exact, K, TARGET)
    assert (tuning.parameter, tuning.value, tuning.recall) == ("none", 0, 1.0)
    assert tuning.reached


def test_search_parameter_ranges(indexes):
    ivf = search_parameter(indexes[IndexKind.IVF].index, IndexKind.IVF, K)
    assert (ivf.name, ivf.lowest, ivf.highest) == ("nprobe", 1, default_nlist(ENTRIES))
    hnsw = search_parameter(indexes[IndexKind.HNSW].index, IndexKind.HNSW, K)
    assert (hnsw.name, hnsw.lowest, hnsw.highest) == ("efSearch", K, 4096)
    assert search_parameter(indexes[IndexKind.HNSW].index, IndexKind.HNSW, 500).highest == 8000
    with pytest.raises(InvalidInputError, match="not a ivf index"):
        search_parameter(indexes[IndexKind.HNSW].index, IndexKind.IVF, K)
    with pytest.raises(InvalidInputError, match="not a hnsw index"):
        search_parameter(indexes[IndexKind.IVF].index, IndexKind.HNSW, K)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.01, math.nan])
def test_bad_targets_are_refused(target, world, indexes):
    _, queries, exact = world
    with pytest.raises(InvalidInputError, match="target recall"):
        tune_search(indexes[IndexKind.IVF].index, IndexKind.IVF, queries, exact, K, target)


def test_bad_k_and_shapes_are_refused(world, indexes):
    _, queries, exact = world
    index = indexes[IndexKind.IVF].index
    with pytest.raises(InvalidInputError, match="K=0"):
        tune_search(index, IndexKind.IVF, queries, exact[:, :0], 0, TARGET)
    with pytest.raises(InvalidInputError, match=f"K={ENTRIES + 1}"):
        tune_search(index, IndexKind.IVF, queries, exact, ENTRIES + 1, TARGET)
    with pytest.raises(InvalidInputError, match="exact ids"):
        tune_search(index, IndexKind.IVF, queries, exact[:, :5], K, TARGET)
    with pytest.raises(InvalidInputError, match="tuning queries"):
        tune_search(index, IndexKind.IVF, queries[:, :8], exact, K, TARGET)


@pytest.mark.parametrize(
    ("entries", "nlist"),
    [
        (1, 1),
        (1_000, 25),  # 4 * sqrt = 126 -> 128, capped at 1000 // 39
        (20_000, 512),  # 4 * sqrt = 566 -> 512
        (100_000, 1_024),  # 1265 -> 1024
        (999_999, 4_096),  # 4000 -> 4096
        (1_000_000, 16_384),
        (20_000_000, 65_536),
        (500_000_000, 131_072),
    ],
)
def test_default_nlist_follows_autofaiss(entries, nlist):
    assert default_nlist(entries) == nlist


def test_default_nlist_refuses_an_empty_dictionary():
    with pytest.raises(InvalidInputError, match="0 entries"):
        default_nlist(0)


def test_recall_at_k_matches_a_naive_loop():
    rng = np.random.default_rng(1)
    exact = np.stack([rng.choice(50, size=K, replace=False) for _ in range(200)])
    approx = np.stack([rng.choice(50, size=K, replace=False) for _ in range(200)])
    approx[::7, -3:] = -1  # incomplete answers
    naive = np.mean(
        [len(set(a.tolist()) & set(e.tolist())) / K for a, e in zip(approx, exact, strict=True)]
    )
    assert recall_at_k(approx, exact) == pytest.approx(naive)
    assert recall_at_k(exact, exact) == 1.0
    with pytest.raises(InvalidInputError, match="id matrices"):
        recall_at_k(approx[:, :5], exact)
    with pytest.raises(InvalidInputError, match="exact ids contain -1"):
        recall_at_k(exact, approx)


def test_exact_neighbours_reads_a_file_block_by_block(tmp_path, world):
    entries, queries, _ = world
    path = tmp_path / "entries.npy"
    np.save(path, entries[:3001])
    ids = exact_neighbours(NpyRows(path), queries[:40], K)
    similarities = queries[:40].astype(np.float64) @ entries[:3001].astype(np.float64).T
    expected = np.argsort(-similarities, axis=1)[:, :K]
    assert (np.sort(ids, axis=1) == np.sort(expected, axis=1)).all()
    ordered = np.take_along_axis(similarities, ids, 1)
    assert (np.diff(ordered, axis=1) <= 1e-6).all()  # most similar first


def test_sample_queries_is_bounded_and_deterministic(world):
    _, queries, _ = world
    picked = sample_queries(queries, limit=100, seed=3)
    assert picked.shape == (100, DIM)
    assert picked.dtype == np.float32
    assert (picked == sample_queries(queries, limit=100, seed=3)).all()
    rows = {row.tobytes() for row in queries}
    assert all(row.tobytes() in rows for row in picked)
    assert sample_queries(queries[:50], limit=100).shape == (50, DIM)
    with pytest.raises(InvalidInputError, match="query limit"):
        sample_queries(queries, limit=0)
