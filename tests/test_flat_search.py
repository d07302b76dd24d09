"""Exact flat search on numpy's BLAS: results, the memory-mapped rows, the kernel line."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import bliss.blas_kernels
import bliss.flat_search
from bliss.blas_kernels import describe_blas, numpy_cblas
from bliss.checksums import file_sha256
from bliss.dictionary_index import DictionaryIndex, IndexKind, IndexOptions, build_index
from bliss.errors import InvalidInputError
from bliss.flat_search import top_k_inner_product

SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")


def reference_ids(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Naive top-k in float64: by similarity, then by id."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    ids = np.broadcast_to(np.arange(len(vectors)), scores.shape)
    return np.lexsort((ids, -scores), axis=1)[:, :k]


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    matrix = rng.standard_normal((rows, dim)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def unaligned_copy(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` at an odd address, as rows of a memory-mapped flat index lie."""
    raw = np.zeros(matrix.nbytes + 8, dtype=np.uint8)
    start = (-raw.ctypes.data) % 8 + 1
    raw[start : start + matrix.nbytes] = matrix.view(np.uint8).ravel()
    view = raw[start : start + matrix.nbytes].view(np.float32).reshape(matrix.shape)
    assert not view.flags.aligned
    return view


@pytest.fixture(params=["cblas", "numpy"])
def kernel(request, monkeypatch) -> str:
    """Runs a test with numpy's CBLAS, then with the numpy.matmul fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(bliss.flat_search, "numpy_cblas", lambda: None)
    elif numpy_cblas() is None:
        pytest.skip("numpy does not bundle scipy-openblas here")
    return request.param


@pytest.mark.parametrize(
    ("batch", "k", "block_rows"),
    [
        (1, 1, None),
        (1, 7, 64),
        (5, 10, 7),  # blocks smaller than k
        (17, 50, 128),  # 1,000 rows: the last block is short
        (64, 999, 333),  # k near t
        (3, 1000, 64),  # k = t
        (2, 4, 1000),  # one block
    ],
)
@pytest.mark.parametrize("aligned", [True, False])
def test_ties_and_ids_match_the_reference(kernel, batch, k, block_rows, aligned):
    # Small integers: every product is exact in float32, and ties are plentiful.
    rng = np.random.default_rng(batch * 1000 + k)
    vectors = rng.integers(-2, 3, size=(1000, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(batch, 8)).astype(np.float32)
    rows = vectors if aligned else unaligned_copy(vectors)

    similarities, ids = top_k_inner_product(rows, queries, k, block_rows=block_rows)

    expected = reference_ids(vectors, queries, k)
    np.testing.assert_array_equal(ids, expected)
    assert ids.dtype == np.int64
    assert similarities.dtype == np.float32
    np.testing.assert_array_equal(similarities, np.take_along_axis(queries @ vectors.T, ids, 1))


@pytest.mark.parametrize(("k", "block_rows"), [(5, None), (32, 300), (40, 300), (5, 20)])
def test_the_first_bound_from_a_blocks_head_columns(monkeypatch, k, block_rows):
    monkeypatch.setattr(bliss.flat_search, "BOUNDING_COLUMNS", 32)
    rng = np.random.default_rng(k)
    vectors = rng.integers(-2, 3, size=(1000, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(6, 8)).astype(np.float32)

    _, ids = top_k_inner_product(vectors, queries, k, block_rows=block_rows)

    np.testing.assert_array_equal(ids, reference_ids(vectors, queries, k))


@pytest.mark.parametrize(("batch", "block_rows"), [(1, None), (8, 129), (70, None)])
def test_similarities_match_the_reference_on_unit_vectors(kernel, batch, block_rows):
    rng = np.random.default_rng(batch)
    vectors = unit_rows(rng, 3000, 64)
    queries = unit_rows(rng, batch, 64)
    rows = unaligned_copy(vectors)

    similarities, _ = top_k_inner_product(rows, queries, 20, block_rows=block_rows)

    expected = -np.sort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1)
    np.testing.assert_allclose(similarities, expected[:, :20], atol=1e-5)


def test_empty_batch_and_bad_shapes():
    vectors = np.eye(4, dtype=np.float32)
    similarities, ids = top_k_inner_product(vectors, np.empty((0, 4), np.float32), 2)
    assert similarities.shape == ids.shape == (0, 2)
    with pytest.raises(InvalidInputError, match="1 <= k <= t"):
        top_k_inner_product(vectors, np.ones((1, 4), np.float32), 5)
    with pytest.raises(InvalidInputError, match=r"\[B, D\]"):
        top_k_inner_product(vectors, np.ones((1, 3), np.float32), 1)


def saved_flat_index(tmp_path: Path, vectors: np.ndarray) -> Path:
    path = tmp_path / "flat.faiss"
    build_index(vectors, IndexOptions(kind=IndexKind.FLAT)).save(path)
    return path


def test_dictionary_search_matches_the_float64_reference(tmp_path):
    rng = np.random.default_rng(7)
    vectors = unit_rows(rng, 2000, 32)
    queries = unit_rows(rng, 9, 32).astype(np.float64)
    index = DictionaryIndex.load(saved_flat_index(tmp_path, vectors), IndexKind.FLAT)

    similarities, ids = index.search(queries, 10)

    np.testing.assert_array_equal(ids, reference_ids(vectors, queries, 10))
    exact = np.einsum("bd,bkd->bk", queries, vectors.astype(np.float64)[ids])
    np.testing.assert_allclose(similarities, exact, rtol=0, atol=1e-15)
    assert similarities.dtype == np.float64


def test_vectors_is_a_read_only_view_of_the_mapped_rows(tmp_path):
    vectors = unit_rows(np.random.default_rng(3), 500, 16)
    index = DictionaryIndex.load(saved_flat_index(tmp_path, vectors), IndexKind.FLAT)

    rows = index.vectors

    assert rows is not None
    assert rows.__array_interface__["data"][0] == int(index.index.get_xb())
    assert not rows.flags.writeable
    np.testing.assert_array_equal(rows, vectors)
    del index
    gc.collect()
    np.testing.assert_array_equal(rows, vectors)  # the view keeps the mapping alive


def test_vectors_of_other_kinds(tmp_path):
    vectors = unit_rows(np.random.default_rng(4), 400, 16)
    hnsw = build_index(vectors, IndexOptions(kind=IndexKind.HNSW))
    np.testing.assert_array_equal(hnsw.vectors, vectors)
    assert build_index(vectors, IndexOptions(kind=IndexKind.IVF, nlist=4)).vectors is None


# Run in a fresh process: in this one, memory freed by earlier tests would be reused by a
# copy of the index without growing the process.
MEMORY_PROBE = """
import sys
from pathlib import Path
from bliss.blas_kernels import numpy_cblas
from bliss.dictionary_index import DictionaryIndex, IndexKind, _faiss

def anonymous():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024

path = Path(sys.argv[1])
_faiss(), numpy_cblas()  # imports and library lookups are not the index
before = anonymous()
mapped = DictionaryIndex.load(path, IndexKind.FLAT)
mapped.search(mapped.vectors[:4], 5)
after_mapped = anonymous()
copied = DictionaryIndex.load(path, IndexKind.FLAT, memory_map=False)
print(after_mapped - before, anonymous() - after_mapped)
"""


@pytest.mark.skipif(not SMAPS_ROLLUP.exists(), reason="needs Linux /proc/self/smaps_rollup")
def test_memory_mapped_load_maps_the_rows_rather_than_copying_them(tmp_path):
    path = saved_flat_index(tmp_path, unit_rows(np.random.default_rng(5), 8192, 512))  # 16 MiB

    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True
    )

    assert probe.returncode == 0, probe.stderr
    mapped, copied = (int(value) for value in probe.stdout.split())
    assert mapped < 4 << 20, f"the memory-mapped load and search added {mapped >> 20} MiB"
    assert copied > 12 << 20, "control: reading the file into memory should add ~16 MiB"


def test_vectors_lie_in_a_mapping_of_the_index_file(tmp_path):
    path = saved_flat_index(tmp_path, unit_rows(np.random.default_rng(8), 100, 8))
    rows = DictionaryIndex.load(path, IndexKind.FLAT).vectors
    address = rows.__array_interface__["data"][0]
    mappings = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    assert any(
        int(low, 16) <= address < int(high, 16) and fields[-1] == str(path)
        for fields in mappings
        for low, high in [fields[0].split("-")]
    )


def test_load_without_the_ifc_flag_and_checksums_still_work(tmp_path, monkeypatch):
    vectors = unit_rows(np.random.default_rng(6), 300, 8)
    path = saved_flat_index(tmp_path, vectors)
    monkeypatch.delattr(faiss, "IO_FLAG_MMAP_IFC")

    index = DictionaryIndex.load(path, IndexKind.FLAT, expected_checksum=file_sha256(path))

    assert index.search(vectors[:2], 1)[1].ravel().tolist() == [0, 1]
    with pytest.raises(InvalidInputError, match="sha256"):
        DictionaryIndex.load(path, IndexKind.FLAT, expected_checksum="0" * 64)


def test_kernel_description_names_the_libraries(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")

    line = describe_blas()

    assert "\n" not in line
    assert "numpy: openblas" in line
    assert "faiss" in line
    assert "flat search:" in line
    assert "OPENBLAS_CORETYPE=Haswell" in line


def test_a_generic_kernel_gets_a_hint(monkeypatch):
    prescott = {
        "user_api": "blas",
        "internal_api": "openblas",
        "filepath": "/site-packages/faiss_cpu.libs/libopenblas.so",
        "version": "0.3.15",
        "architecture": "Prescott",
        "num_threads": 2,
        "threading_layer": "openmp",
    }
    monkeypatch.setattr(bliss.blas_kernels, "_blas_libraries", lambda: [prescott])

    line = describe_blas()

    assert "faiss_cpu: openblas 0.3.15 Prescott kernel" in line
    assert "OPENBLAS_CORETYPE=SkylakeX" in line


def test_faiss_threads_setting_also_limits_the_flat_search_blas() -> None:
    # In a subprocess: the limit is process-wide and would slow the rest of the suite.
    script = (
        "import numpy, faiss\n"
        "from threadpoolctl import threadpool_info\n"
        "from bliss.server.runtime import _configure_faiss_threads\n"
        "_configure_faiss_threads(1)\n"
        "blas = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
        "print(faiss.omp_get_max_threads(), blas)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    omp_threads, blas_threads = result.stdout.split(" ", 1)
    assert omp_threads == "1"
    assert set(ast.literal_eval(blas_threads)) == {1}
