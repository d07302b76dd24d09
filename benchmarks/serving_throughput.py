"""Scoring throughput and latency through the gRPC service, next to in-process scoring.

Embedding requests, D = 512, 10 classes, K = 10, dictionaries of 1,850 and 100,000
entries (synthetic bundles built with the indexer). For unary batches of 1, 64 and 1,024
and for a stream of 64-item batches (4 unanswered at a time): items/s and p50/p99 latency
through a server process (bliss.server.runtime.serve, what `bliss serve` runs) called with
BlissClient, and the same batches scored in this process with Scorer.score (no gRPC).
"+top entries" also asks for the K entry texts (the in-process column does not fetch them).
Target: at batch >= 64 the service delivers >= 70% of the in-process rate.

    python benchmarks/serving_throughput.py [--entries 1850 100000] [--seconds 3]
        [--rounds 3] [--work-dir DIR] [--server-setting NAME=VALUE ...]

--work-dir keeps the built indexes for the next run. Each measurement is repeated in
interleaved rounds (in-process, service, in-process, ...) and the best round of each side
is reported, so a busy neighbour on the machine does not decide the comparison.

The server runs as a separate process on this machine, so client and server share its
CPUs, as they would share a node.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bliss.cli import main as bliss_main
from bliss.client import Batch, BlissClient
from bliss.embedding_bundle import write_bundle
from bliss.store import Store
from bliss.version_loader import load_scorer

DIM = 512
CLASSES = 10
PER_CLASS = 40
K = 10
BATCHES = (1, 64, 1024)
STREAM_BATCH = 64
STREAM_WINDOW = 4
SERVER = """
import asyncio, json, sys
from bliss.server.runtime import serve
from bliss.server.settings import ServerSettings
settings = ServerSettings(**json.loads(sys.argv[1]))
def started(server):
    print(server.port, flush=True)
asyncio.run(serve(settings, on_started=started))
"""


@dataclass(frozen=True)
class Measurement:
    items_per_s: float
    p50_ms: float
    p99_ms: float


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def build_index(work: Path, entries: int) -> tuple[Path, str]:
    """Data dir with an active index ``bench<entries>`` (built once per work dir)."""
    data = work / "data"
    name = f"bench{entries}"
    marker = work / f"{name}.built"
    if marker.exists():
        return data, name
    rng = np.random.default_rng(entries)
    text_offset, image_offset = rng.normal(size=DIM) * 3, rng.normal(size=DIM) * 3
    concepts = rng.normal(size=(CLASSES, DIM))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    bundle = work / f"bundle{entries}"
    write_bundle(
        bundle,
        dictionary_texts=[f"entry {i}" for i in range(entries)],
        dictionary=unit_rows(text_offset + rng.normal(size=(entries, DIM))),
        class_names=[f"class {i}" for i in range(CLASSES)],
        class_text=unit_rows(text_offset + concepts),
        normal=unit_rows(image_offset + concepts[labels] + rng.normal(size=(len(labels), DIM))),
        normal_labels=labels,
    )
    code = bliss_main(
        ["-q", "index", "build", "--name", name, "--from-embeddings", str(bundle), "--activate",
         "--data-dir", str(data)]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"building {name} failed")
    marker.touch()
    return data, name


def queries(count: int, seed: int = 7) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).normal(size=(count, DIM)))


def measure(call, batch: int, seconds: float, min_calls: int = 3) -> Measurement:
    """Call repeatedly for about ``seconds`` (after one warm-up call)."""
    call()
    latencies = []
    started = time.perf_counter()
    while len(latencies) < min_calls or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - begin)
    elapsed = sum(latencies)
    return _summary(latencies, batch * len(latencies) / elapsed)


def _summary(latencies: list[float], items_per_s: float) -> Measurement:
    ms = np.array(latencies) * 1000
    return Measurement(items_per_s, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


def measure_stream(client: BlissClient, index: str, vectors: np.ndarray, seconds: float):
    """A stream of STREAM_BATCH-item batches, STREAM_WINDOW of them unanswered at a time;
    latency from handing a batch over to its reply."""
    sent: queue.Queue[float] = queue.Queue()
    window = threading.Semaphore(STREAM_WINDOW)
    stop = threading.Event()

    def batches():
        while window.acquire() and not stop.is_set():
            sent.put(time.perf_counter())
            yield Batch(embeddings=vectors)

    latencies = []
    started = time.perf_counter()
    stream = client.score_stream(batches(), index=index, top_entries=False)
    for _ in stream:
        latencies.append(time.perf_counter() - sent.get())
        window.release()
        # At least three windows' worth, so filling the pipeline does not dominate.
        if time.perf_counter() - started > seconds and len(latencies) >= 3 * STREAM_WINDOW:
            stop.set()
            break
    elapsed = time.perf_counter() - started
    stream.close()
    return _summary(latencies, STREAM_BATCH * len(latencies) / elapsed)


def start_server(data: Path, overrides: dict[str, object]) -> tuple[subprocess.Popen, str]:
    settings = {"data_dir": str(data), "host": "127.0.0.1", "port": 0, "metrics": False,
                "max_batch_items": 4096, **overrides}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, json.dumps(settings)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    port = process.stdout.readline().strip()
    if not port.isdigit():
        process.kill()
        raise SystemExit("the server did not start")
    return process, f"127.0.0.1:{port}"


def best(measurements: list[Measurement]) -> Measurement:
    """The round with the highest rate: other work on the machine only ever slows a round."""
    return max(measurements, key=lambda m: m.items_per_s)


def run(entries: int, work: Path, seconds: float, rounds: int, overrides: dict) -> list[tuple]:
    data, name = build_index(work, entries)
    rows = []
    process, address = start_server(data, overrides)
    try:
        with (
            Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store,
            BlissClient(address, timeout_s=600) as client,
        ):
            scorer = load_scorer(store, store.get_version(name), data)
            local: dict[int, Measurement] = {}
            for batch in BATCHES:
                vectors = queries(batch)
                local_runs, remote_runs = [], []
                for _ in range(rounds):  # interleaved, so both sides see the same machine
                    local_runs.append(
                        measure(lambda v=vectors: scorer.score(v, k=K), batch, seconds)
                    )
                    remote_runs.append(
                        measure(
                            lambda v=vectors: client.score(
                                embeddings=v, index=name, k=K, top_entries=False
                            ),
                            batch,
                            seconds,
                        )
                    )
                local[batch] = best(local_runs)
                rows.append((entries, f"unary {batch}", best(remote_runs), local[batch]))
            vectors = queries(STREAM_BATCH)
            streams = [measure_stream(client, name, vectors, seconds) for _ in range(rounds)]
            rows.append((entries, f"stream {STREAM_BATCH}", best(streams), local[STREAM_BATCH]))
            with_texts = [
                measure(
                    lambda: client.score(embeddings=vectors, index=name, k=K, top_entries=True),
                    STREAM_BATCH,
                    seconds,
                )
                for _ in range(rounds)
            ]
            rows.append(
                (entries, f"unary {STREAM_BATCH} +top entries", best(with_texts), local[64])
            )
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows


def print_table(rows: list[tuple]) -> None:
    header = (
        f"{'dictionary':>10}  {'request':<24} {'service items/s':>15} {'p50 ms':>8} "
        f"{'p99 ms':>8}  {'in-process items/s':>18} {'p50 ms':>8} {'p99 ms':>8}  {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for entries, label, remote, local in rows:
        print(
            f"{entries:>10,}  {label:<24} {remote.items_per_s:>15,.0f} {remote.p50_ms:>8.2f} "
            f"{remote.p99_ms:>8.2f}  {local.items_per_s:>18,.0f} {local.p50_ms:>8.2f} "
            f"{local.p99_ms:>8.2f}  {remote.items_per_s / local.items_per_s:>6.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[1850, 100_000])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept")
    parser.add_argument("--work-dir", type=Path, help="keep built indexes here between runs")
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ServerSettings field for the server, e.g. scoring_threads=2 (repeatable)",
    )
    args = parser.parse_args()
    overrides = dict(setting.split("=", 1) for setting in args.server_setting)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows = [
            row
            for entries in args.entries
            for row in run(entries, work, args.seconds, args.rounds, overrides)
        ]
    print_table(rows)
    if overrides:
        print(f"server settings: {overrides}")


if __name__ == "__main__":
    main()
