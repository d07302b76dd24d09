"""Soak: random valid and invalid requests against a real `bliss serve` process for a while.

Builds a small index with the test-only random CLIP model (`bliss-tiny-random-TEST-ONLY`,
so it takes images as well as embeddings), starts `bliss serve` as its own process and
sends, from --concurrency threads, a random mix: good embeddings and images (PNG, JPEG,
WebP, GIF, mixed with embeddings), streams, index calls, and invalid requests (wrong
dimensions, NaN/zero vectors, broken and bomb images, wild K/lambda/modes, unknown
indexes, too many items, bytes that are no message, deadlines too short to make). Once a
second it checks that the process is alive, that health answers SERVING and samples its
resident memory (VmRSS from /proc). It reports the requests tried, the status codes seen
(by kind of request), crashes (the process gone, or health not answering: must be 0),
statuses that blame the server (INTERNAL, UNKNOWN: should be 0) and the RSS growth from
the end of the warm-up (--warmup-s) to the maximum.

    python benchmarks/soak.py [--seconds 120] [--concurrency 8] [--warmup-s 15] [--work-dir DIR]

Exits 1 when there was a crash or a status that blames the server.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bliss.cli import main as bliss_main
from bliss.encoders import TINY_TEST_MODEL
from bliss.synthetic_images import write_shape_folders
from bliss.v1 import scorer_pb2, scorer_pb2_grpc

BLISS = str(Path(sys.executable).with_name("bliss"))
ANNOUNCEMENT = re.compile(r"bliss serve listening on 127\.0\.0\.1:(\d+)")
WORDS = ["cat", "dog", "circle", "box", "star", "tree", "wheel", "sign", "roof", "kite"]
MAX_BATCH_ITEMS = 64
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SCORER = "/bliss.v1.AnomalyScorer"


def build_index(work: Path) -> Path:
    data = work / "data"
    if (work / "soak.built").exists():
        return data
    write_shape_folders(work / "normal", ["circle", "square", "triangle"], 4, seed=2, size=32)
    words = work / "words.txt"
    words.write_text("".join(f"{w}\n" for w in WORDS))
    code = bliss_main(
        ["-q", "index", "build", "--name", "shapes", "--from-images", str(work / "normal"),
         "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--activate",
         "--data-dir", str(data)]
    )  # fmt: skip
    if code != 0:
        raise SystemExit("building the index failed")
    (work / "soak.built").touch()
    return data


def start_server(data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    command = [
        BLISS, "serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", "0",
        "--no-metrics", "--max-batch-items", str(MAX_BATCH_ITEMS), "--max-image-pixels",
        "1000000", "--health-check-interval-s", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 (the server process owns it)
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    match = ANNOUNCEMENT.search(process.stdout.readline())
    if match is None:
        process.kill()
        raise SystemExit(f"bliss serve did not start: see {log}")
    return process, f"127.0.0.1:{match.group(1)}"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line")


# --------------------------------------------------------------------------- requests


def image_file(rng: random.Random, kind: str) -> bytes:
    side = rng.randint(8, 96)
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 255, (side, side, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def embedding(vector: np.ndarray) -> scorer_pb2.Embedding:
    return scorer_pb2.Embedding(values=vector.astype("<f4").tobytes(), dim=len(vector))


class Traffic:
    """Random requests; ``kind()`` names each for the report."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)

    def vector(self) -> np.ndarray:
        return self.np.normal(size=self.dim).astype(np.float32)

    def options(self, **overrides: object) -> scorer_pb2.ScoreOptions:
        options = scorer_pb2.ScoreOptions(
            index=self.rng.choice(["", "shapes"]),
            mode=self.rng.randint(0, 3),
            return_class_scores=self.rng.random() < 0.5,
            return_top_entries=self.rng.random() < 0.5,
        )
        if self.rng.random() < 0.5:
            options.k = self.rng.randint(1, len(WORDS))
        if self.rng.random() < 0.5:
            options.lambda_weight = self.rng.uniform(0, 3)
        for name, value in overrides.items():
            setattr(options, name, value)
        return options

    def good_items(self, count: int, images: float) -> list[scorer_pb2.Item]:
        items = []
        for i in range(count):
            item = scorer_pb2.Item(id=f"item-{i}")
            if self.rng.random() < images:
                item.image = image_file(self.rng, self.rng.choice(["PNG", "JPEG", "WEBP", "GIF"]))
            else:
                item.embedding.CopyFrom(embedding(self.vector()))
            items.append(item)
        return items

    def request(self) -> tuple[str, scorer_pb2.ScoreRequest | bytes]:
        """(kind, request message or raw bytes)."""
        roll = self.rng.random()
        if roll < 0.30:
            items = self.good_items(self.rng.randint(1, MAX_BATCH_ITEMS), images=0)
            return "embeddings", scorer_pb2.ScoreRequest(items=items, options=self.options())
        if roll < 0.45:
            items = self.good_items(self.rng.randint(1, 6), images=1)
            return "images", scorer_pb2.ScoreRequest(items=items, options=self.options())
        if roll < 0.55:
            items = self.good_items(self.rng.randint(2, 8), images=0.5)
            return "mixed", scorer_pb2.ScoreRequest(items=items, options=self.options())
        if roll < 0.93:
            return self.invalid()
        return "garbage bytes", self.np.bytes(self.rng.randint(1, 400))

    def invalid(self) -> tuple[str, scorer_pb2.ScoreRequest]:
        kind = self.rng.choice(
            ["wrong dim", "nan", "zeros", "broken image", "bomb image", "k", "lambda", "mode",
             "unknown index", "no items", "empty item", "too many items"]
        )  # fmt: skip
        items = self.good_items(self.rng.randint(1, 4), images=0.3)
        options = self.options()
        if kind == "wrong dim":
            items[0].embedding.CopyFrom(embedding(self.np.normal(size=self.dim + 3)))
        elif kind == "nan":
            vector = self.vector()
            vector[self.rng.randrange(self.dim)] = np.nan
            items[0].embedding.CopyFrom(embedding(vector))
        elif kind == "zeros":
            items[0].embedding.CopyFrom(embedding(np.zeros(self.dim, np.float32)))
        elif kind == "broken image":
            data = bytearray(image_file(self.rng, "PNG"))
            items[0].image = bytes(data[: self.rng.randint(0, len(data) - 1)])
        elif kind == "bomb image":
            items[0].image = png_declaring(100_000, 100_000)
        elif kind == "k":
            options.k = self.rng.choice([0, len(WORDS) + 1, 2**31])
        elif kind == "lambda":
            options.lambda_weight = self.rng.choice([float("nan"), float("inf"), -1.0, 1e300])
        elif kind == "mode":
            options.mode = self.rng.choice([-1, 17])
        elif kind == "unknown index":
            options.index = "no-such-index"
        elif kind == "no items":
            items = []
        elif kind == "empty item":
            items.append(scorer_pb2.Item(id="nothing"))
        else:
            items = self.good_items(MAX_BATCH_ITEMS + 1, images=0)
        return kind, scorer_pb2.ScoreRequest(items=items, options=options)


# --------------------------------------------------------------------------- soak


class Soak:
    def __init__(self, address: str, dim: int, seconds: float) -> None:
        self.address = address
        self.dim = dim
        self.ends = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.codes: Counter[tuple[str, str]] = Counter()
        self.tried = 0
        self.client_errors: list[str] = []

    def record(self, kind: str, code: grpc.StatusCode) -> None:
        with self.lock:
            self.tried += 1
            self.codes[(kind, code.name)] += 1

    def worker(self, seed: int) -> None:
        traffic = Traffic(self.dim, seed)
        channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        )
        stub = scorer_pb2_grpc.AnomalyScorerStub(channel)
        raw_score = channel.unary_unary(f"{SCORER}/Score")
        calls: list[Callable[[], tuple[str, Callable[[], object]]]] = [
            lambda: self.score(traffic, stub, raw_score),
            lambda: ("stream", lambda: list(stub.ScoreStream(self.stream(traffic), timeout=60))),
            lambda: ("index info", lambda: stub.GetIndexInfo(scorer_pb2.GetIndexInfoRequest())),
            lambda: ("list", lambda: stub.ListIndexes(scorer_pb2.ListIndexesRequest())),
            lambda: ("tiny deadline", self.score(traffic, stub, raw_score, timeout_s=0.0005)[1]),
        ]
        weights = [80, 8, 3, 3, 6]
        try:
            while time.monotonic() < self.ends:
                kind, call = traffic.rng.choices(calls, weights)[0]()
                try:
                    call()
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                except (TypeError, ValueError) as error:  # a request the client cannot send
                    self.client_errors.append(f"{kind}: {error}")
                    continue
                self.record(kind, code)
        finally:
            channel.close()

    def score(
        self, traffic: Traffic, stub, raw_score, timeout_s: float = 60
    ) -> tuple[str, Callable[[], object]]:
        kind, request = traffic.request()
        if isinstance(request, bytes):
            return kind, lambda: raw_score(request, timeout=timeout_s)
        return kind, lambda: stub.Score(request, timeout=timeout_s)

    def stream(self, traffic: Traffic):
        for _ in range(traffic.rng.randint(1, 5)):
            request = traffic.request()[1]
            if isinstance(request, scorer_pb2.ScoreRequest):
                yield request


def watch(process: subprocess.Popen, address: str, soak: Soak, warmup_s: float) -> dict:
    """Once a second: alive, health SERVING, RSS. Returns what it saw."""
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    seen = {"crashes": 0, "health_failures": [], "rss": [], "baseline_mib": None}
    while time.monotonic() < soak.ends:
        time.sleep(1)
        if process.poll() is not None:
            seen["crashes"] += 1
            break
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                seen["health_failures"].append(
                    health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                )
        except grpc.RpcError as error:
            seen["health_failures"].append(error.code().name)
        rss = rss_mib(process.pid)
        seen["rss"].append(rss)
        if seen["baseline_mib"] is None and time.monotonic() - started >= warmup_s:
            seen["baseline_mib"] = rss
    channel.close()
    if seen["health_failures"]:
        seen["crashes"] += 1
    return seen


def report(soak: Soak, seen: dict, seconds: float, alive: bool) -> int:
    print(f"soak: {soak.tried:,} requests in {seconds:.0f} s ({soak.tried / seconds:,.0f}/s)")
    totals: Counter[str] = Counter()
    for (_, code), count in soak.codes.items():
        totals[code] += count
    print("status codes: " + ", ".join(f"{code} {n:,}" for code, n in totals.most_common()))
    kinds = sorted({kind for kind, _ in soak.codes})
    for kind in kinds:
        line = ", ".join(
            f"{code} {n:,}" for (k, code), n in sorted(soak.codes.items()) if k == kind
        )
        print(f"  {kind:<15} {line}")
    faults = sum(n for (_, code), n in soak.codes.items() if grpc.StatusCode[code] in SERVER_FAULTS)
    rss = seen["rss"]
    baseline = seen["baseline_mib"] or (rss[0] if rss else float("nan"))
    peak = max(rss) if rss else float("nan")
    print(f"crashes: {seen['crashes']} (process alive at the end: {alive}; health failures: "
          f"{len(seen['health_failures'])})")  # fmt: skip
    print(f"statuses blaming the server (INTERNAL, UNKNOWN): {faults}")
    print(
        f"server RSS: {rss[0] if rss else float('nan'):.0f} MiB at 1 s, {baseline:.0f} MiB after "
        f"warm-up, max {peak:.0f} MiB, end {rss[-1] if rss else float('nan'):.0f} MiB: "
        f"max growth after warm-up {peak - baseline:+.0f} MiB"
    )
    if soak.client_errors:
        print(f"requests the client could not send: {len(soak.client_errors)}")
    return 1 if seen["crashes"] or faults or not alive else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=15.0, help="before the RSS baseline")
    parser.add_argument("--work-dir", type=Path, help="keep the built index here between runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data = build_index(work)
        log = work / "server.log"
        process, address = start_server(data, log)
        try:
            with grpc.insecure_channel(address) as channel:
                info = scorer_pb2_grpc.AnomalyScorerStub(channel).GetIndexInfo(
                    scorer_pb2.GetIndexInfoRequest(), timeout=60
                )
            soak = Soak(address, info.embedding_dim, args.seconds)
            workers = [
                threading.Thread(target=soak.worker, args=(seed,))
                for seed in range(args.concurrency)
            ]
            started = time.monotonic()
            for worker in workers:
                worker.start()
            seen = watch(process, address, soak, args.warmup_s)
            for worker in workers:
                worker.join()
            elapsed = time.monotonic() - started
            alive = process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=60)
        tracebacks = log.read_text().count("Traceback")
        code = report(soak, seen, elapsed, alive)
        print(f"server log: {tracebacks} tracebacks")
    return code


if __name__ == "__main__":
    sys.exit(main())
