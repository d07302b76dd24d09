"""Small-request latency while a huge batch runs, with and without micro-batching.

A server process (bliss.server.runtime.serve, what `bliss serve` runs) serves a synthetic
index (D = 512, 10 classes, --entries dictionary entries, built with the indexer). For
each setting of --micro-batch-items (the default and 0, which scores each request whole)
this measures the latency of small requests (1 to 8 embeddings, --small-rate a second,
each sent on schedule) alone, then again while another client process sends
--huge-items embeddings per request back to back, and prints p50/p99 of both and their
ratio, plus the huge requests' latency. The last lines compare the two settings,
measured in the same run.

    python benchmarks/request_fairness.py [--entries 20000] [--seconds 10]
        [--micro-batch-items 256] [--huge-items 4096] [--small-rate 20] [--rounds 1]
        [--work-dir DIR]

--work-dir keeps the built index for the next run. With --rounds > 1 the settings are
measured in interleaved rounds and the median of each number is printed. Client and
server share this machine's CPUs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from serving_throughput import DIM, build_index, start_server, unit_rows

from bliss.client import BlissClient

SMALL_ITEMS = (1, 8)
# The huge requests come from a process of their own, so that building and reading them
# does not hold the measuring process's GIL: one latency in ms per line, until stdin closes.
HUGE_CLIENT = """
import sys, threading, time
import numpy as np
from bliss.client import BlissClient
from serving_throughput import DIM, build_index, start_server, unit_rows
address, items, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = np.random.default_rng(1).normal(size=(items, dim)).astype(np.float32)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with BlissClient(address, timeout_s=600) as client:
    while not stop.is_set():
        started = time.perf_counter()
        client.score(embeddings=rows)
        print((time.perf_counter() - started) * 1000, flush=True)
"""


@dataclass(frozen=True)
class Round:
    alone_p50_ms: float
    alone_p99_ms: float
    loaded_p50_ms: float
    loaded_p99_ms: float
    huge_p50_ms: float
    huge_calls: int


def small_latencies(client: BlissClient, seconds: float, rate: float, seed: int) -> list[float]:
    """Small requests at a fixed rate for ``seconds``, each sent on time whether or not the
    earlier ones were answered (a closed loop would send fewer while the server stalls and
    hide the stall); each call's latency in ms."""
    rng = np.random.default_rng(seed)
    pool = unit_rows(rng.normal(size=(64, DIM)))

    def call(rows: np.ndarray) -> float:
        started = time.perf_counter()
        client.score(embeddings=rows)
        return (time.perf_counter() - started) * 1000

    calls = []
    with ThreadPoolExecutor(max_workers=256) as senders:
        begin = time.perf_counter()
        for sent in range(int(seconds * rate)):
            time.sleep(max(0.0, begin + sent / rate - time.perf_counter()))
            count = int(rng.integers(SMALL_ITEMS[0], SMALL_ITEMS[1] + 1))
            calls.append(senders.submit(call, pool[rng.integers(0, len(pool), count)]))
        return [c.result() for c in calls]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(
    data: Path, micro_batch_items: int, huge_items: int, seconds: float, rate: float
) -> Round:
    process, address = start_server(data, {"micro_batch_items": micro_batch_items})
    huge_ms: list[float] = []
    try:
        with BlissClient(address, timeout_s=600) as small:
            small_latencies(small, 1.0, rate, seed=0)  # warm-up: connection, first search
            alone = small_latencies(small, seconds, rate, seed=1)
            huge = subprocess.Popen(
                [sys.executable, "-c", HUGE_CLIENT, address, str(huge_items), str(DIM)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            reader = threading.Thread(target=lambda: huge_ms.extend(map(float, huge.stdout)))
            reader.start()
            try:
                while not huge_ms:  # the first huge call is done: steady state from here
                    time.sleep(0.01)
                loaded = small_latencies(small, seconds, rate, seed=2)
            finally:
                huge.stdin.close()  # it stops after its current call
                huge.wait(timeout=600)
                reader.join()
    finally:
        process.terminate()
        process.wait(timeout=60)
    return Round(
        percentile(alone, 50),
        percentile(alone, 99),
        percentile(loaded, 50),
        percentile(loaded, 99),
        percentile(huge_ms[1:], 50),
        len(huge_ms),
    )


def median_round(rounds: list[Round]) -> Round:
    values = {f.name: statistics.median(getattr(r, f.name) for r in rounds) for f in fields(Round)}
    return Round(**values)


def print_results(results: dict[int, Round], entries: int, huge_items: int) -> None:
    print(
        f"dictionary {entries:,} entries, D={DIM}; small requests of {SMALL_ITEMS[0]}-"
        f"{SMALL_ITEMS[1]} items at a fixed rate; a concurrent loop of {huge_items:,}-item requests"
    )
    header = (
        f"{'micro-batch':>11}  {'alone p50':>9} {'alone p99':>9}  {'loaded p50':>10} "
        f"{'loaded p99':>10}  {'p50 x':>6} {'p99 x':>6}  {'huge p50 ms':>11} {'huge calls':>10}"
    )
    print(header)
    print("-" * len(header))
    for size, r in results.items():
        label = "off (0)" if size == 0 else str(size)
        print(
            f"{label:>11}  {r.alone_p50_ms:>9.1f} {r.alone_p99_ms:>9.1f}  {r.loaded_p50_ms:>10.1f} "
            f"{r.loaded_p99_ms:>10.1f}  {r.loaded_p50_ms / r.alone_p50_ms:>6.1f} "
            f"{r.loaded_p99_ms / r.alone_p99_ms:>6.1f}  {r.huge_p50_ms:>11.1f} {r.huge_calls:>10}"
        )
    on, off = (results[size] for size in results)
    print(
        f"small requests under load, micro-batching on vs off: p50 {on.loaded_p50_ms:.1f} vs "
        f"{off.loaded_p50_ms:.1f} ms ({off.loaded_p50_ms / on.loaded_p50_ms:.1f}x lower), "
        f"p99 {on.loaded_p99_ms:.1f} vs {off.loaded_p99_ms:.1f} ms "
        f"({off.loaded_p99_ms / on.loaded_p99_ms:.1f}x lower)"
    )
    print(
        f"huge requests, on vs off: p50 {on.huge_p50_ms:.0f} vs {off.huge_p50_ms:.0f} ms "
        f"({on.huge_p50_ms / off.huge_p50_ms:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--micro-batch-items", type=int, default=256)
    parser.add_argument("--huge-items", type=int, default=4096)
    parser.add_argument("--small-rate", type=float, default=20.0, help="small requests per s")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved; medians printed")
    parser.add_argument("--work-dir", type=Path, help="keep the built index here between runs")
    args = parser.parse_args()
    if args.micro_batch_items <= 0:
        parser.error("--micro-batch-items must be positive (0, off, is always measured too)")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data, _ = build_index(work, args.entries)  # the same index as serving_throughput.py
        settings = (args.micro_batch_items, 0)
        rounds: dict[int, list[Round]] = {size: [] for size in settings}
        for _ in range(args.rounds):
            for size in settings:
                rounds[size].append(
                    measure(data, size, args.huge_items, args.seconds, args.small_rate)
                )
    print_results(
        {size: median_round(runs) for size, runs in rounds.items()}, args.entries, args.huge_items
    )


if __name__ == "__main__":
    main()
