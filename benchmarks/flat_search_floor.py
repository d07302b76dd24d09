"""Flat search against the GEMM floor measured in the same run.

For each dictionary size t, writes a random unit-norm flat index with ``build_index(...)
.save(path)``, loads it memory-mapped with ``DictionaryIndex.load``, and times, for each
batch size B (median of ``--repeats`` runs after one warm-up, the three interleaved so
that other load on the machine hits them alike, each after a short idle pause):

- floor: numpy ``q @ d.T`` then ``np.argpartition`` top-k, on an aligned in-memory copy of
  the mapped rows (on the mapped rows themselves numpy.matmul leaves BLAS for a 14x
  slower loop, since they are not 4-byte aligned). The product is one call into a
  [B, t] buffer allocated before timing (a fresh 4 GB result per call spends seconds in
  page faults); the partition runs 64 query rows at a time, the same work in bounded
  memory;
- bliss: ``DictionaryIndex.search``, what the server runs (float64 re-scoring included);
- faiss: the raw faiss ``index.search`` on the same mapped index, for context.

floor/bliss >= 0.8 is the target. "agree" is the fraction of queries whose top-k id set
is the floor's.

    .venv/bin/python benchmarks/flat_search_floor.py --entries 100000 1000000 \\
        --batches 64 1024 --dim 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bliss.blas_kernels import describe_blas
from bliss.dictionary_index import DictionaryIndex, IndexKind, build_index

PARTITION_ROWS = 64
# Idle time before each timed run: OpenBLAS's pthreads spin for ~0.1 s after a call and
# would slow whichever contender (faiss's OpenMP threads) runs next on a small machine.
SETTLE_S = 0.25
GENERATE_ROWS = 65_536


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """Random unit-norm float32 rows, generated in chunks to stay within 1x the result."""
    matrix = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, GENERATE_ROWS):
        chunk = rng.standard_normal((min(GENERATE_ROWS, rows - start), dim), dtype=np.float32)
        matrix[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return matrix


def write_index(directory: Path, entries: int, dim: int) -> Path:
    path = directory / f"flat-{entries}x{dim}.faiss"
    build_index(unit_rows(np.random.default_rng(0), entries, dim)).save(path)
    return path


def floor_top_k(rows: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray) -> np.ndarray:
    np.matmul(queries, rows.T, out=scores)
    return np.concatenate(
        [
            # copy: a view would keep each chunk's whole [64, t] int64 partition alive
            np.argpartition(scores[start : start + PARTITION_ROWS], -k, axis=1)[:, -k:].copy()
            for start in range(0, len(scores), PARTITION_ROWS)
        ]
    )


def median_ms(runs: list[float]) -> float:
    return statistics.median(runs) * 1e3


def time_interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time (ms) of each contender, and each one's last result."""
    results = {name: run() for name, run in contenders.items()}  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            results[name] = run()
            runs[name].append(time.perf_counter() - start)
    return {name: median_ms(times) for name, times in runs.items()}, results


def agreement(ids: np.ndarray, reference: np.ndarray) -> float:
    same = [set(row) == set(expected) for row, expected in zip(ids, reference, strict=True)]
    return float(np.mean(same))


def measure(path: Path, batches: list[int], k: int, repeats: int) -> None:
    index = DictionaryIndex.load(path, IndexKind.FLAT)
    mapped = index.vectors
    assert mapped is not None, "a flat index keeps its rows in one array"
    aligned = np.array(mapped)  # the floor's copy: numpy BLAS needs aligned rows
    for batch in batches:
        queries = unit_rows(np.random.default_rng(batch), batch, index.dim)
        scores = np.zeros((batch, index.ntotal), dtype=np.float32)  # allocated and touched
        medians, results = time_interleaved(
            {
                "floor": lambda q=queries, s=scores: floor_top_k(aligned, q, k, s),
                "bliss": lambda q=queries: index.search(q, k)[1],
                "faiss": lambda q=queries: index.index.search(q, k)[1],
            },
            repeats,
        )
        floor, bliss, faiss = medians["floor"], medians["bliss"], medians["faiss"]
        agree = agreement(results["bliss"], results["floor"])
        print(
            f"{index.ntotal:>9,} {batch:>5} {floor:>10.1f} {bliss:>10.1f} {faiss:>10.1f} "
            f"{floor / bliss:>11.2f} {floor / faiss:>11.2f} {agree:>6.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--directory", type=Path, help="where to write the indexes (temp)")
    args = parser.parse_args()

    print(f"BLAS: {describe_blas()}")
    print(
        f"{'entries':>9} {'batch':>5} {'floor ms':>10} {'bliss ms':>10} {'faiss ms':>10} "
        f"{'floor/bliss':>11} {'floor/faiss':>11} {'agree':>6}"
    )
    with tempfile.TemporaryDirectory(dir=args.directory) as directory:
        for entries in args.entries:
            path = write_index(Path(directory), entries, args.dim)
            measure(path, args.batches, args.k, args.repeats)
            path.unlink()


if __name__ == "__main__":
    main()
