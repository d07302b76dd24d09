"""Helpers of benchmarks/huge_dictionary.py: a synthetic clustered bundle written in
chunks, measured child processes, a server's memory split by mapping, and the search
floors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from flat_search_floor import floor_top_k

from bliss.client import BlissClient
from bliss.flat_search import default_block_rows
from bliss.npy_files import NpyWriter

# Largest floor score buffer: 1,024 x 1M in one product, 5M in five.
FLOOR_SCORE_BYTES = 4 * 2**30
BLISS = str(Path(sys.executable).with_name("bliss"))
CHUNK_ROWS = 65_536  # 128 MiB of float32 at D = 512: the generator's whole footprint
CENTRES = 4096
CENTRES_PER_CLASS = 4
# Noise norm relative to the unit centre: an entry's cosine to its centre is about 0.7,
# to another centre about 0, so each query's true top-k sits in one or two clusters.
SPREAD = 1.0
# Independent random streams of the generator (numpy seeds are sequences of ints).
ENTRIES, ASSIGNMENTS, NORMAL, QUERIES, PICKS = range(1, 6)
STAGE_LINE = re.compile(r"^  (\S.*?)\s+(\d+\.\d+) s$")
ANNOUNCEMENT = re.compile(r"bliss serve listening on 127\.0\.0\.1:(\d+)")
# Text log lines "2026-01-02 03:04:05,678 INFO    logger: message": the index load runs
# from "loading NAME@V" to "serving NAME@V".
LOAD_LINE = re.compile(r"^(\S+ \d\d:\d\d:\d\d,\d{3}) .*: (loading|serving) \S+@\d+")
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"
ROLLUP_FIELDS = (
    "Rss",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
    "Anonymous",
)


@dataclass(frozen=True)
class World:
    """The synthetic embedding space: random unit centres, classes near a few of them."""

    dim: int
    classes: int
    centres: np.ndarray  # float32 [CENTRES, D], unit rows
    class_centres: np.ndarray  # int [N, CENTRES_PER_CLASS]

    @classmethod
    def create(cls, dim: int, classes: int, seed: int = 0) -> World:
        rng = np.random.default_rng(seed)
        centres = unit_rows(rng.standard_normal((CENTRES, dim), dtype=np.float32))
        picked = rng.choice(CENTRES, size=(classes, CENTRES_PER_CLASS), replace=False)
        return cls(dim, classes, centres, picked)

    def near(self, centre_ids: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
        """Unit rows scattered around the given centres (one row per id)."""
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((len(centre_ids), self.dim), dtype=np.float32)
        noise *= np.float32(SPREAD / np.sqrt(self.dim))
        noise += self.centres[centre_ids]
        return unit_rows(noise)

    def images(self, per_class: int, seed: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Normal-like images [N * per_class, D] and their class labels."""
        labels = np.repeat(np.arange(self.classes), per_class)
        rng = np.random.default_rng((*seed, PICKS))
        which = rng.integers(0, CENTRES_PER_CLASS, size=len(labels))
        return self.near(self.class_centres[labels, which], seed), labels

    def queries(self, count: int, seed: int) -> np.ndarray:
        """Held-out images of random classes: what a server would be asked to score."""
        images, _ = self.images(count // self.classes + 1, (QUERIES, seed))
        picked = np.random.default_rng((QUERIES, PICKS, seed)).choice(
            len(images), size=count, replace=False
        )
        return images[picked]


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix.astype(np.float32, copy=False)


def write_bundle(folder: Path, world: World, entries: int, per_class: int) -> None:
    """A bundle of ``entries`` clustered entries, never more than one chunk in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((ASSIGNMENTS, entries))
    with (
        NpyWriter(folder / "dictionary.npy", entries, (world.dim,), "<f4") as writer,
        open(folder / "dictionary.txt", "w", encoding="utf-8") as texts,
    ):
        for start in range(0, entries, CHUNK_ROWS):
            count = min(CHUNK_ROWS, entries - start)
            writer.write(world.near(rng.integers(0, CENTRES, size=count), (ENTRIES, start)))
            texts.writelines(f"entry {i:09d}\n" for i in range(start, start + count))
    images, labels = world.images(per_class, (NORMAL,))
    labels_text = world.centres[world.class_centres].mean(axis=1)
    (folder / "classes.txt").write_text("".join(f"class {c}\n" for c in range(world.classes)))
    np.save(folder / "class_text.npy", unit_rows(labels_text.astype(np.float32)))
    np.save(folder / "normal.npy", images)
    np.save(folder / "normal_labels.npy", labels.astype(np.int64))


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    output: str


def run_measured(command: list[str], log: Path) -> ChildRun:
    """Run ``command``, its stdout and stderr to ``log``; its own peak RSS via wait4."""
    started = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        # wait4 reports this child's rusage alone (RUSAGE_CHILDREN would be the maximum
        # over every child so far).
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return ChildRun(process.returncode, wall, usage.ru_maxrss * 1024, log.read_text())


def parse_stages(output: str) -> dict[str, float]:
    """The per-stage seconds a build prints after its 'built ...' line."""
    stages = {}
    for line in output.splitlines():
        match = STAGE_LINE.match(line)
        if match:
            stages[match.group(1)] = float(match.group(2))
    return stages


def evict_page_cache(paths: list[Path]) -> None:
    """Drop the files' clean cached pages, so that a start-up reads them cold."""
    for path in paths:
        files = path.rglob("*") if path.is_dir() else [path]
        for file in files:
            if not file.is_file():
                continue
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_use(data: Path) -> dict[str, int]:
    return {
        "faiss": sum(tree_bytes(p) for p in data.rglob("*.faiss")),
        "artifacts": sum(tree_bytes(p) for p in data.rglob("*.artifacts")),
        "store": sum(tree_bytes(p) for p in data.glob("bliss.sqlite3*")),
        "total": tree_bytes(data),
    }


@dataclass(frozen=True)
class Memory:
    """kB of a process: smaps_rollup fields, and the same summed over the data dir's files."""

    total: dict[str, int]
    files: dict[str, int]

    def private(self, part: dict[str, int]) -> int:
        return part["Private_Clean"] + part["Private_Dirty"]

    def shared(self, part: dict[str, int]) -> int:
        return part["Shared_Clean"] + part["Shared_Dirty"]


def process_memory(pid: int, data_dir: Path) -> Memory:
    total = _fields(Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    inside = str(data_dir.resolve()) + os.sep
    lines: list[str] = []
    keep = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            # A mapping header: address range, perms, offset, device, inode, [path].
            keep = len(head) == 6 and head[5].startswith(inside)
        elif keep:
            lines.append(line)
    return Memory(total, _fields(lines))


def _fields(lines: list[str]) -> dict[str, int]:
    sums = dict.fromkeys(ROLLUP_FIELDS, 0)
    for line in lines:
        name, _, value = line.partition(":")
        if name in sums:
            sums[name] += int(value.split()[0])
    return sums


class Server:
    """A `bliss serve` process on a free port; start-up is timed to health SERVING."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.log = log
        started = time.perf_counter()
        self._sink = open(log, "w")  # noqa: SIM115 (closed in stop())
        command = [
            BLISS, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
            "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._sink,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        # The announcement comes after the active versions are loaded; health confirms.
        match = ANNOUNCEMENT.search(self.process.stdout.readline())
        if match is None:
            self.stop()
            raise RuntimeError(f"bliss serve did not start; see {log}")
        self.address = f"127.0.0.1:{match.group(1)}"
        self.client = BlissClient(self.address, timeout_s=600)
        while self.client.health() != "SERVING":
            time.sleep(0.02)
        self.startup_s = time.perf_counter() - started

    @property
    def load_s(self) -> float | None:
        """The index load time the server logged (the rest of start-up is the process)."""
        times = {}
        for line in self.log.read_text().splitlines():
            match = LOAD_LINE.match(line)
            if match:
                times.setdefault(match.group(2), datetime.strptime(match.group(1), LOG_TIME))
        if len(times) < 2:
            return None
        return (times["serving"] - times["loading"]).total_seconds()

    def score_ms(self, queries: np.ndarray, index: str) -> float:
        started = time.perf_counter()
        self.client.score(embeddings=queries, index=index, top_entries=True)
        return (time.perf_counter() - started) * 1e3

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._sink.close()


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    print(f"\n{title}\n{lines[0]}\n{'-' * len(lines[0])}")
    print("\n".join(lines[1:]), flush=True)


def chunked_floor(rows: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray) -> np.ndarray:
    """floor_top_k through the preallocated ``scores`` [b, t], b queries at a time: all of
    them up to 1,024 x 1M, while 1,024 x 5M would need 20 GiB of scores."""
    step = len(scores)
    return np.concatenate(
        [
            floor_top_k(rows, queries[i : i + step], k, scores[: len(queries[i : i + step])])
            for i in range(0, len(queries), step)
        ]
    )


def floor_scores(rows: np.ndarray, batch: int) -> np.ndarray:
    """The floor's score buffer, allocated and touched before timing (fresh pages for a
    [B, t] result would cost the floor seconds of page faults per call)."""
    return np.zeros(
        (min(batch, max(1, FLOOR_SCORE_BYTES // (4 * len(rows)))), len(rows)), np.float32
    )


def gemm_only(rows: np.ndarray, queries: np.ndarray) -> None:
    """The products alone, in bliss's blocks, into one reused buffer: no selection and no
    fresh pages for scores, so no exact search can beat it."""
    step = default_block_rows(len(queries), rows.shape[1])
    out = np.empty((len(queries), step), dtype=np.float32)
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        np.matmul(queries, block.T, out=out[:, : len(block)])


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    found = [len(set(row) & set(truth)) for row, truth in zip(ids, exact, strict=True)]
    return float(np.mean(found)) / exact.shape[1]
