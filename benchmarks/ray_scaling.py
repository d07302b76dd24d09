"""Does the Ray backend pay off? The same build, local and on Ray, in one run.

Builds one version (the tiny test model, a ``file:`` dictionary of generated words and
generated shape images) with ``--backend local`` and with Ray at 1 and 2 encoders and at
the default encoder count, each as its own ``bliss`` process with its own local Ray
cluster (so start-up is included), and prints wall and encoding times, local/Ray
ratios, the scaling efficiency from 1 to 2 encoders (time1 / (2 * time2); 1.0 is
perfect), the driver's peak RSS and the peak PSS of the driver plus every process it
started (Ray's daemons and workers; PSS counts shared pages once).

    .venv/bin/python benchmarks/ray_scaling.py --words 4000 --images 200
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bliss.encoders import TINY_TEST_MODEL
from bliss.synthetic_images import SHAPES, write_shape_folders

BLISS = Path(sys.executable).with_name("bliss")
CONFIGS = {
    "local": ["--backend", "local"],
    "ray, 1 encoder": ["--backend", "ray", "--ray-encoders", "1"],
    "ray, 2 encoders": ["--backend", "ray", "--ray-encoders", "2"],
    "ray, 1 encoder x 2 threads": [
        "--backend", "ray", "--ray-encoders", "1", "--ray-cpus-per-encoder", "2",
    ],
    "ray, default": ["--backend", "ray"],
}  # fmt: skip
ENCODING_STAGES = ("dictionary embeddings", "normal embeddings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=4000, help="dictionary entries")
    parser.add_argument("--images", type=int, default=200, help="images per class")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (best)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as scratch:
        root = Path(scratch)
        write_shape_folders(root / "images", SHAPES[: args.classes], args.images, seed=1)
        words = root / "words.txt"
        words.write_text("".join(f"word {i} of {args.words}\n" for i in range(args.words)))
        print(
            f"{args.words} dictionary entries, {args.classes} x {args.images} images, "
            f"chunks of {args.chunk_size}, {os.cpu_count()} CPUs; best of {args.repeats}"
        )
        results = {}
        for name in args.configs:
            tag = list(CONFIGS).index(name)
            runs = [
                build(root, words, CONFIGS[name], args.chunk_size, f"{tag}-{attempt}")
                for attempt in range(args.repeats)
            ]
            results[name] = min(runs, key=lambda run: run["wall"])
            print_row(name, results[name], results.get("local"))
    summary(results)


def build(root: Path, words: Path, options: list[str], chunk_size: int, tag: str) -> dict:
    command = [
        str(BLISS), "index", "build", "--name", "bench", "--from-images", str(root / "images"),
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}",
        "--chunk-size", str(chunk_size), "--data-dir", str(root / f"data-{tag}"), *options,
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    driver_peak = tree_peak = 0
    while process.poll() is None:
        driver_peak = max(driver_peak, status_kib(process.pid, "VmHWM"))
        tree_peak = max(tree_peak, sum(pss_kib(pid) for pid in [process.pid, *tree(process.pid)]))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with code {process.returncode}")
    stages = dict(re.findall(r"^\s+(.+?)\s+([\d.]+) s$", output, flags=re.MULTILINE))
    encode = sum(float(stages[stage]) for stage in ENCODING_STAGES)
    return {"wall": wall, "encode": encode, "driver": driver_peak, "tree": tree_peak}


def print_row(name: str, run: dict, local: dict | None) -> None:
    ratio = f"{local['wall'] / run['wall']:5.2f} {local['encode'] / run['encode']:5.2f}"
    print(
        f"{name:<27} wall {run['wall']:6.1f} s  encode {run['encode']:6.1f} s  "
        f"local/this (wall, encode) {ratio if local else '  -     -  '}  "
        f"driver peak RSS {run['driver'] / 1024:5.0f} MiB  all processes peak PSS "
        f"{run['tree'] / 1024:5.0f} MiB",
        flush=True,
    )


def summary(results: dict) -> None:
    one, two = results.get("ray, 1 encoder"), results.get("ray, 2 encoders")
    if one and two:
        print(
            f"scaling efficiency 1 -> 2 encoders, time1 / (2 * time2): "
            f"wall {one['wall'] / (2 * two['wall']):.2f}, "
            f"encode {one['encode'] / (2 * two['encode']):.2f}"
        )


def tree(pid: int) -> list[int]:
    """Every descendant of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    main()
