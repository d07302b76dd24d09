"""A dictionary in milvus-lite against the same dictionary in a flat FAISS file.

One synthetic bundle (t entries, D = 512, 10 classes of 200 normal images; see
huge_dictionary_parts.World) is built twice in moments mode, each build a `bliss index
build` child process: into a flat FAISS file, and into a FLAT milvus-lite collection
(`--dictionary-store milvus:FILE`). For each: build wall time and peak RSS, disk use;
then a `bliss serve` process on it: start-up to SERVING, the server's RSS, and the
latency of scoring a batch (median of --repeats after a warm-up; top entries returned).
The scores of both servers are compared (they must agree to 1e-6 relative, with the same
top entries). Ratios are Milvus / FAISS, measured in the same run.

    .venv/bin/python benchmarks/milvus_dictionary.py [--entries 1000000] [--batch 64]
        [--repeats 5] [--work DIR]

milvus-lite is Milvus's embedded engine (one process, a local file): a Milvus cluster's
numbers differ (network hops, sharded search, GPU indexes) and could not be measured here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from huge_dictionary_parts import (
    BLISS,
    Server,
    World,
    parse_stages,
    print_table,
    process_memory,
    run_measured,
    tree_bytes,
    write_bundle,
)

GiB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bliss-milvus-"))
    world = World.create(args.dim, classes=10)
    bundle = work / "bundle"
    if not (bundle / "dictionary.npy").is_file():
        write_bundle(bundle, world, args.entries, per_class=200)
    queries = world.queries(args.batch, seed=1)
    stores = {"faiss": [], "milvus": ["--dictionary-store", f"milvus:{work / 'milvus.db'}"]}
    rows, scores = [], {}
    for store, extra in stores.items():
        data = work / store
        built = run_measured(
            [
                BLISS, "index", "build", "--name", "d", "--from-embeddings", str(bundle),
                "--statistics-mode", "moments", "--activate", "--data-dir", str(data), *extra,
            ],
            work / f"build-{store}.log",
        )  # fmt: skip
        if built.returncode != 0:
            raise SystemExit(f"the {store} build failed: see {work / f'build-{store}.log'}")
        disk = tree_bytes(data) + (tree_bytes(work / "milvus.db") if store == "milvus" else 0)
        server = Server(data, work / f"serve-{store}.log")
        try:
            server.score_ms(queries, "d")  # warm-up
            latency = statistics.median(server.score_ms(queries, "d") for _ in range(args.repeats))
            scores[store] = server.client.score(embeddings=queries, index="d", top_entries=True)
            rss = process_memory(server.process.pid, data).total["Rss"] * 1024
        finally:
            server.stop()
        stage = parse_stages(built.output)
        index_stage = stage.get("faiss index", stage.get("milvus collection", 0.0))
        rows.append(
            [store, built.wall_s, index_stage, built.peak_rss_bytes / GiB, disk / GiB,
             server.startup_s, rss / GiB, latency]
        )  # fmt: skip
    _report(args, rows, scores)


def _report(args: argparse.Namespace, rows: list[list], scores: dict[str, list]) -> None:
    header = ["store", "build s", "index s", "build RSS GiB", "disk GiB", "start s",
              "server RSS GiB", f"score {args.batch} ms"]  # fmt: skip
    print_table(
        f"{args.entries:,} entries x {args.dim}, moments mode, batch {args.batch}, "
        f"median of {args.repeats}",
        header,
        [[row[0], *(f"{value:.2f}" for value in row[1:])] for row in rows],
    )
    faiss, milvus = rows
    ratios = [f"{m / f:.2f}" if f else "-" for f, m in zip(faiss[1:], milvus[1:], strict=True)]
    print_table("Milvus / FAISS", header, [["ratio", *ratios]])
    expected = np.array([item.score for item in scores["faiss"]])
    got = np.array([item.score for item in scores["milvus"]])
    same_entries = all(
        [e.text for e in a.top_entries] == [e.text for e in b.top_entries]
        for a, b in zip(scores["faiss"], scores["milvus"], strict=True)
    )
    relative = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)))
    print(
        f"parity: max relative score difference {relative:.2e} (target <= 1e-6), same top "
        f"entries: {same_entries}"
    )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
