"""Build and serve a huge dictionary: flat, IVF and moments mode at 1M (and 5M) entries.

For each dictionary size t (D = 512, N = 10 classes of 200 normal images, entries around
4,096 random centres, so that recall means something):

1. a synthetic bundle, written chunk by chunk (never whole in memory);
2. builds, each a `bliss index build` child process: flat + table, flat + moments, IVF +
   table (--nlist 1024 --target-recall 0.95). Per-stage seconds as the build prints them;
   "unstaged" is the rest of its wall time (bundle checks and fingerprint hashing before
   the first stage); the child's own peak RSS (wait4) against the dictionary's float32
   size t*D*4; disk use of its data directory;
3. per version, `bliss serve` on its data directory, with every file of this size
   (bundle and versions) evicted from the page cache first: start-up to health SERVING
   ("load": the index load the server logs), the first (cold) and second batch of 64
   scored, and the server's memory from /proc/PID/smaps_rollup, with the part mapped
   from the version's files (/proc/PID/smaps). Then a second server on the same data
   scores the same batch: the file pages turn from private to shared, nothing is copied;
4. in-process search (DictionaryIndex.search, what the server runs) at batch 64 and
   1,024, k = 10, against the GEMM floor of benchmarks/flat_search_floor.py (numpy
   q @ d.T + argpartition, here over the bundle's memory-mapped dictionary.npy, whose rows
   are aligned; at most 4 GiB of scores per product), median of --repeats after a
   warm-up, interleaved; recall@10 against it. "gemm" times the products alone (no
   top-k), in the same blocks as bliss.flat_search: a true lower bound;
5. score error on 1,024 held-out images: max |BLISS score change| of moments vs table and
   IVF vs flat, beside what `bliss index describe` recorded for the IVF tuning.

A summary line checks the targets: build peak RSS <= 1.75 t*D*4; flat search >= 0.8x the
floor; start-up <= 10 s; server anonymous memory <= 512 MiB; and the second server's
version-file pages shared (its private part under 5% of them).

    .venv/bin/python benchmarks/huge_dictionary.py --entries 1000000 [5000000]
        [--builds flat-table flat-moments ivf-table] [--dim 512] [--work DIR] [--keep]
        [--skip-build] [--repeats 3]

Without --work, a temporary folder under /tmp is used and removed at the end unless
--keep; a --work folder is kept, and --skip-build reuses its bundles and versions.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flat_search_floor import time_interleaved
from huge_dictionary_parts import (
    BLISS,
    Memory,
    Server,
    World,
    chunked_floor,
    disk_use,
    evict_page_cache,
    floor_scores,
    gemm_only,
    mem_available_bytes,
    parse_stages,
    print_table,
    process_memory,
    recall,
    run_measured,
    tree_bytes,
    write_bundle,
)

from bliss.dictionary_index import DictionaryIndex
from bliss.scorer import Scorer
from bliss.store import Store
from bliss.version_loader import load_scorer

BUILDS: dict[str, list[str]] = {
    "flat-table": ["--index-kind", "flat", "--statistics-mode", "table"],
    "flat-moments": ["--index-kind", "flat", "--statistics-mode", "moments"],
    # nlist fixed: k-means with the default 4*sqrt(t) lists is too slow on small machines.
    "ivf-table": ["--index-kind", "ivf", "--statistics-mode", "table", "--nlist", "1024",
                  "--target-recall", "0.95"],
}  # fmt: skip
CLASSES = 10
PER_CLASS = 200
K = 10
BATCHES = (64, 1024)
SERVE_BATCH = 64
ERROR_QUERIES = 1024
GIB = 2**30
RSS_TARGET = 1.75
FLOOR_TARGET = 0.8
STARTUP_TARGET_S = 10.0
ANONYMOUS_TARGET_MIB = 512
SHARED_PRIVATE_SHARE = 0.05
# Below this share of the available memory, the floor's rows and the index files are
# taken to stay cached together, and are timed interleaved.
PAGE_CACHE_SHARE = 0.7
# Disk a table-mode build needs per (class, entry), measured at 50,000 entries: the
# artifacts' two float64 columns, the store rows and the build workspace's copy.
TABLE_BYTES_PER_STATISTIC = 150


@dataclass
class Build:
    label: str
    entries: int
    dim: int
    stages: dict[str, float]
    wall_s: float
    peak_rss_bytes: int
    disk_bytes: dict[str, int]

    @property
    def rss_ratio(self) -> float:
        return self.peak_rss_bytes / (self.entries * self.dim * 4)


@dataclass
class Results:
    """What the summary checks, over every size."""

    builds: list[Build] = field(default_factory=list)
    floor_ratios: list[float] = field(default_factory=list)
    startups: list[float] = field(default_factory=list)
    anonymous_kib: list[int] = field(default_factory=list)
    second_private_share: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """Where one dictionary size's bundle and versions live under the work folder."""

    root: Path

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    def folder(self, label: str) -> Path:
        return self.root / label

    def data(self, label: str) -> Path:
        return self.root / label / "data"


# ----------------------------------------------------------------------------- builds


def disk_needed(entries: int, dim: int, labels: list[str]) -> int:
    vectors = entries * dim * 4
    need = vectors  # the bundle
    for label in labels:
        need += vectors + entries * 64  # index file (IVF: + direct map), texts
        if label.endswith("table"):
            need += entries * CLASSES * TABLE_BYTES_PER_STATISTIC
    return need


def prepare_bundle(layout: Layout, world: World, entries: int) -> None:
    done = layout.bundle / ".complete"
    if done.exists():
        return
    started = time.perf_counter()
    write_bundle(layout.bundle, world, entries, PER_CLASS)
    done.touch()
    print(f"bundle of {entries:,} entries written in {time.perf_counter() - started:.1f} s")


def build(layout: Layout, label: str, entries: int, dim: int) -> Build:
    data = layout.data(label)
    layout.folder(label).mkdir(parents=True, exist_ok=True)
    command = [
        BLISS, "index", "build", "--name", label, "--from-embeddings", str(layout.bundle),
        "--activate", "--data-dir", str(data), *BUILDS[label],
    ]  # fmt: skip
    print(f"building {label} ({entries:,} entries) ...", flush=True)
    run = run_measured(command, layout.folder(label) / "build.log")
    if run.returncode != 0:
        raise SystemExit(f"the {label} build failed; see {layout.folder(label) / 'build.log'}")
    result = Build(
        label, entries, dim, parse_stages(run.output), run.wall_s, run.peak_rss_bytes,
        disk_use(data),
    )  # fmt: skip
    (layout.folder(label) / "build.json").write_text(json.dumps(asdict(result)))
    return result


def load_build(layout: Layout, label: str) -> Build | None:
    record = layout.folder(label) / "build.json"
    return Build(**json.loads(record.read_text())) if record.is_file() else None


def print_builds(entries: int, builds: list[Build]) -> None:
    stages = list(dict.fromkeys(stage for b in builds for stage in b.stages))
    rows = [[stage] + [f"{b.stages.get(stage, 0.0):.1f}" for b in builds] for stage in stages]
    rows.append(
        ["unstaged (checks, hashing)"]
        + [f"{b.wall_s - sum(b.stages.values()):.1f}" for b in builds]
    )
    rows.append(["wall"] + [f"{b.wall_s:.1f}" for b in builds])
    rows.append(["peak RSS GiB"] + [f"{b.peak_rss_bytes / GIB:.2f}" for b in builds])
    rows.append(["peak RSS / t*D*4"] + [f"{b.rss_ratio:.2f}x" for b in builds])
    for part in ("faiss", "artifacts", "store", "total"):
        rows.append([f"disk {part} GiB"] + [f"{b.disk_bytes[part] / GIB:.2f}" for b in builds])
    header = ["build stage (s)"] + [b.label for b in builds]
    print_table(f"builds, {entries:,} entries (t*D*4 = {_dictionary_gib(builds):.2f} GiB)",
                header, rows)  # fmt: skip


def _dictionary_gib(builds: list[Build]) -> float:
    return builds[0].entries * builds[0].dim * 4 / GIB


# ---------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class Serving:
    startup_s: tuple[float, float]  # first server (cold page cache), second
    load_s: tuple[float | None, float | None]
    cold_ms: float
    warm_ms: float
    memory: dict[str, Memory]  # "A alone", "B", "A with B"


def serve_version(layout: Layout, label: str, world: World) -> Serving:
    data = layout.data(label)
    # The whole size folder: other versions and the bundle, hot from their builds, would
    # otherwise compete with this version for the page cache.
    evict_page_cache([layout.root])
    queries = world.queries(SERVE_BATCH, seed=1)
    first = Server(data, layout.folder(label) / "serve-a.log")
    try:
        cold_ms = first.score_ms(queries, label)
        warm_ms = first.score_ms(queries, label)
        alone = process_memory(first.process.pid, data)
        second = Server(data, layout.folder(label) / "serve-b.log")
        try:
            second.score_ms(queries, label)
            memory = {
                "A alone": alone,
                "B": process_memory(second.process.pid, data),
                "A with B": process_memory(first.process.pid, data),
            }
        finally:
            second.stop()
    finally:
        first.stop()
    return Serving(
        (first.startup_s, second.startup_s), (first.load_s, second.load_s), cold_ms, warm_ms,
        memory,
    )  # fmt: skip


def serving_rows(label: str, serving: Serving, results: Results) -> list[list[str]]:
    rows = []
    for process, memory in serving.memory.items():
        started = {"A alone": 0, "B": 1}.get(process)
        total, files = memory.total, memory.files
        rows.append([
            label, process,
            "" if started is None else f"{serving.startup_s[started]:.2f}",
            "" if started is None else _seconds(serving.load_s[started]),
            f"{serving.cold_ms:.0f}" if process == "A alone" else "",
            f"{serving.warm_ms:.0f}" if process == "A alone" else "",
            _mib(total["Rss"]), _mib(memory.private(total)), _mib(memory.private(files)),
            _mib(memory.shared(total)), _mib(memory.shared(files)), _mib(total["Anonymous"]),
        ])  # fmt: skip
    second = serving.memory["B"]
    results.startups.append(serving.startup_s[0])
    results.anonymous_kib.append(serving.memory["A alone"].total["Anonymous"])
    results.second_private_share.append(second.private(second.files) / max(1, second.files["Rss"]))
    return rows


SERVING_HEADER = [
    "version", "process", "start-up s", "load s", "cold batch ms", "warm batch ms",
    "RSS MiB", "private MiB", "private in files", "shared MiB", "shared in files",
    "anonymous MiB",
]  # fmt: skip


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------- search


def open_scorer(layout: Layout, label: str) -> Scorer:
    data = layout.data(label)
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        return load_scorer(store, store.get_version(label), data)


def search_rows(
    layout: Layout, labels: list[str], world: World, repeats: int, results: Results
) -> list[list[str]]:
    """Flat (one index: both modes share its file) and IVF search against the floor."""
    flat = next((label for label in labels if label.startswith("flat")), None)
    searched = [label for label in (flat, "ivf-table") if label in labels]
    indexes = {label: open_scorer(layout, label).index for label in searched}
    mapped_bytes = tree_bytes(layout.bundle / "dictionary.npy") * (1 + len(searched))
    together = mapped_bytes < PAGE_CACHE_SHARE * mem_available_bytes()
    print(
        f"\nsearch: {mapped_bytes / GIB:.1f} GiB of mapped files, "
        f"{mem_available_bytes() / GIB:.1f} GiB available: "
        f"{'interleaved' if together else 'floors first, then bliss (page cache too small)'}; "
        f"load average {os.getloadavg()[0]:.2f} (other work slows every column)",
        flush=True,
    )
    table = []
    for batch in BATCHES:
        queries = world.queries(batch, seed=100 + batch)
        searches = {
            label: functools.partial(_search_ids, index, queries)
            for label, index in indexes.items()
        }
        medians, ids = time_floors(layout, queries, searches if together else {}, repeats)
        if not together:
            # The floors' pages go, so that the index files stay cached while timed.
            evict_page_cache([layout.bundle])
            more_medians, more_ids = time_interleaved(searches, repeats)
            medians, ids = medians | more_medians, ids | more_ids
        for label in indexes:
            ratio = medians["floor"] / medians[label]
            if label == flat:
                results.floor_ratios.append(ratio)
            table.append([
                label, str(batch), f"{medians['floor']:.1f}", f"{medians['gemm']:.1f}",
                f"{medians[label]:.1f}", f"{ratio:.2f}", f"{medians['gemm'] / medians[label]:.2f}",
                f"{recall(ids[label], ids['floor']):.4f}",
            ])  # fmt: skip
    return table


def time_floors(
    layout: Layout, queries: np.ndarray, others: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, object]]:
    """The floors over the bundle's mapped rows, interleaved with ``others``; nothing
    refers to the mapping after return, so it is unmapped and its pages can be evicted."""
    rows = np.load(layout.bundle / "dictionary.npy", mmap_mode="r")
    contenders = {
        "floor": functools.partial(
            chunked_floor, rows, queries, K, floor_scores(rows, len(queries))
        ),
        "gemm": functools.partial(gemm_only, rows, queries),
        **others,
    }
    return time_interleaved(contenders, repeats)


def _search_ids(index: DictionaryIndex, queries: np.ndarray) -> np.ndarray:
    return index.search(queries, K)[1]


SEARCH_HEADER = [
    "index", "batch", "floor ms", "gemm ms", "bliss ms", "floor/bliss", "gemm/bliss", "recall@10",
]  # fmt: skip


# ------------------------------------------------------------------------ score error


def score_error_rows(layout: Layout, labels: list[str], world: World) -> list[list[str]]:
    """Max |score change| against flat-table; one scorer mapped at a time."""
    queries = world.queries(ERROR_QUERIES, seed=7)
    scores = {}
    for label in labels:
        scores[label] = open_scorer(layout, label).score(queries, k=K).score
    reference = "flat-table"
    rows = []
    for label in labels:
        tuning = describe(layout, label)["search_tuning"] or {}
        change = (
            f"{np.abs(scores[label] - scores[reference]).max():.3g}"
            if reference in scores and label != reference
            else ""
        )
        rows.append([
            label, change,
            f"{tuning['parameter']}={tuning['value']}" if tuning else "",
            f"{tuning['measured_recall']:.4f}" if tuning else "",
            f"{tuning['max_bliss_score_change']:.3g}" if tuning else "",
        ])  # fmt: skip
    return rows


def describe(layout: Layout, label: str) -> dict:
    command = [BLISS, "index", "describe", label, "--json", "--data-dir", str(layout.data(label))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


ERROR_HEADER = [
    "version", "max |score - flat-table|", "tuned", "describe recall@10",
    "describe max score change",
]  # fmt: skip


# ---------------------------------------------------------------------------- summary


def print_summary(results: Results) -> None:
    checks = [
        ("build peak RSS", [b.rss_ratio for b in results.builds], max,
         lambda v: v <= RSS_TARGET, f"<= {RSS_TARGET}x t*D*4", "{:.2f}x"),
        ("flat search", results.floor_ratios, min, lambda v: v >= FLOOR_TARGET,
         f">= {FLOOR_TARGET}x floor", "{:.2f}x"),
        ("start-up", results.startups, max, lambda v: v <= STARTUP_TARGET_S,
         f"<= {STARTUP_TARGET_S:.0f} s", "{:.1f} s"),
        ("server anonymous", [k / 1024 for k in results.anonymous_kib], max,
         lambda v: v <= ANONYMOUS_TARGET_MIB, f"<= {ANONYMOUS_TARGET_MIB} MiB", "{:.0f} MiB"),
        ("2nd server private file pages", results.second_private_share, max,
         lambda v: v <= SHARED_PRIVATE_SHARE, f"<= {SHARED_PRIVATE_SHARE:.0%}", "{:.1%}"),
    ]  # fmt: skip
    parts = []
    for name, values, worst, passes, target, shown in checks:
        if not values:
            parts.append(f"{name} {target}: not measured")
            continue
        value = worst(values)
        verdict = "PASS" if passes(value) else "FAIL"
        parts.append(f"{name} {target}: {verdict} (worst {shown.format(value)})")
    print("\ntargets: " + " | ".join(parts))


# ------------------------------------------------------------------------------- main


def run_size(entries: int, args: argparse.Namespace, work: Path, results: Results) -> None:
    layout = Layout(work / f"t{entries}")
    world = World.create(args.dim, CLASSES)
    if args.skip_build:
        builds = [b for b in (load_build(layout, label) for label in args.builds) if b]
        labels = [label for label in args.builds if layout.data(label).is_dir()]
    else:
        needed, free = disk_needed(entries, args.dim, args.builds), shutil.disk_usage(work).free
        if needed > free:
            print(f"\nskipping {entries:,} entries: about {needed / GIB:.0f} GiB of disk "
                  f"needed, {free / GIB:.0f} GiB free in {work}")  # fmt: skip
            return
        prepare_bundle(layout, world, entries)
        builds = [build(layout, label, entries, args.dim) for label in args.builds]
        labels = list(args.builds)
    if builds:
        print_builds(entries, builds)
        results.builds.extend(builds)
    rows = []
    for label in labels:
        rows += serving_rows(label, serve_version(layout, label, world), results)
    title = f"{entries:,} entries"
    print_table(f"serving, {title} (memory after a batch of {SERVE_BATCH})", SERVING_HEADER, rows)
    search = search_rows(layout, labels, world, args.repeats, results)
    print_table(f"search, {title}, k={K} (median of {args.repeats})", SEARCH_HEADER, search)
    errors = score_error_rows(layout, labels, world)
    print_table(f"score error, {title}, {ERROR_QUERIES} held-out images", ERROR_HEADER, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--builds", nargs="+", choices=list(BUILDS), default=list(BUILDS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, help="keep bundles and versions here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--skip-build", action="store_true", help="reuse --work's versions")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per median")
    args = parser.parse_args()
    if args.skip_build and args.work is None:
        parser.error("--skip-build needs --work")
    work = args.work or Path(tempfile.mkdtemp(prefix="huge_dictionary-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results = Results()
    try:
        for entries in args.entries:
            run_size(entries, args, work, results)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
    print_summary(results)


if __name__ == "__main__":
    main()
