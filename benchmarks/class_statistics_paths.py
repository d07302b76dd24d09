"""Time eqs. 4 and 8 by each statistics path: direct versus moment-based.

Default workload (the foundation issue's): 10 classes x 100,000 dictionary entries,
D = 512, 5,000 normal images per class. Prints a table of wall time, time per class,
peak extra memory (tracemalloc) and the largest difference between the two paths.

    .venv/bin/python benchmarks/class_statistics_paths.py [--classes 10 --entries 100000 ...]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from bliss.class_statistics import (
    ClassMoments,
    StatisticsPath,
    cheaper_path,
    class_statistics,
)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--per-class", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    dictionary = unit_rows(rng.normal(size=(args.entries, args.dim)) + 2.0)
    labels = unit_rows(rng.normal(size=(args.classes, args.dim)) + 2.0)
    normals = [
        unit_rows(rng.normal(size=(args.per_class, args.dim)) + 1.0) for _ in range(args.classes)
    ]

    results = {}
    rows = []
    for path in (StatisticsPath.MOMENTS, StatisticsPath.DIRECT):
        tracemalloc.start()
        started = time.perf_counter()
        results[path] = [
            class_statistics(label, dictionary, ClassMoments.of(normal), normal, path=path)
            for label, normal in zip(labels, normals, strict=True)
        ]
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append((path.value, seconds, seconds / args.classes, peak / 2**20))

    difference = max(
        max(np.abs(a.entry_mean - b.entry_mean).max(), np.abs(a.entry_std - b.entry_std).max())
        for a, b in zip(
            results[StatisticsPath.MOMENTS], results[StatisticsPath.DIRECT], strict=True
        )
    )
    print(
        f"{args.classes} classes x {args.entries:,} entries, D = {args.dim}, "
        f"{args.per_class:,} normal images per class"
    )
    print("| path | total s | s per class | peak extra MiB |")
    print("|---|---|---|---|")
    for name, seconds, per_class, peak in rows:
        print(f"| {name} | {seconds:.1f} | {per_class:.2f} | {peak:.0f} |")
    print(f"max |direct - moments| over means and stds: {difference:.2e}")
    print(f"auto picks: {cheaper_path(args.per_class, args.dim).value}")


if __name__ == "__main__":
    main()
