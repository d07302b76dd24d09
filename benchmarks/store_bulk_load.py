"""Write and read back entry statistics (eq. 8 rows) on SQLite and PostgreSQL.

Target: 10 classes x 100,000 entries written and read back in a few seconds each.

    python benchmarks/store_bulk_load.py [--classes 10] [--entries 100000]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/test] [--no-postgres]

PostgreSQL runs in a scratch database created next to the one named by the URL (default
from BLISS_TEST_POSTGRES_URL) and dropped afterwards; SQLite in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bliss.indexer.build_run import STATISTICS_BLOCK_ROWS
from bliss.store import ClassRecord, Store
from bliss.store.database import normalize_url

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GATHER_IDS = 640  # one server batch: 64 images x K = 10
GATHER_REPEATS = 50


@contextmanager
def scratch_postgres(base_url: str) -> Iterator[str]:
    base = make_url(normalize_url(base_url))
    name = f"bliss_bench_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(url: str, n_classes: int, n_entries: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    means = rng.standard_normal((n_classes, n_entries))
    stds = rng.random((n_classes, n_entries))
    dim = 16
    seconds: dict[str, float] = {}
    with Store.open(url, migrate=True) as store:
        version = store.create_version(
            name="bench", model_name="bench", model_weights="", model_checksum=None,
            embedding_dim=dim, prompt_template="This is a photo of a {}",
            dictionary_source="synthetic", dictionary_size=n_entries, faiss_path="",
            faiss_kind="flat", default_k=10, default_lambda=0.5, eps=1e-8,
            build_fingerprint="0" * 64,
        )  # fmt: skip
        store.write_classes(version.id, [
            ClassRecord(
                position=c, name=f"class {c}", prompt=f"a photo of class {c}",
                label_embedding=np.ones(dim, np.float32), label_mean=0.2, label_std=0.01,
                sample_count=10, moment_mean=np.ones(dim), moment_covariance=np.eye(dim),
            )
            for c in range(n_classes)
        ])  # fmt: skip
        seconds["write entries"], _ = timed(
            lambda: store.write_entries(version.id, (f"entry {i}" for i in range(n_entries)))
        )
        block = max(1, STATISTICS_BLOCK_ROWS // n_classes)  # as the indexer writes them
        seconds["write statistics (all classes)"], _ = timed(
            lambda: [
                store.write_entry_statistics(
                    version.id,
                    start,
                    means[:, start : start + block],
                    stds[:, start : start + block],
                )
                for start in range(0, n_entries, block)
            ]
        )
        store.set_faiss_file(version.id, path="bench.faiss", kind="flat", checksum="0" * 64)
        seconds["mark ready (completeness check)"], _ = timed(lambda: store.mark_ready(version.id))
        seconds["read all statistics"], (mean, std) = timed(
            lambda: store.all_entry_statistics(version.id, n_classes, n_entries)
        )
        assert np.array_equal(mean, means) and np.array_equal(std, stds), "round trip differs"
        ids = rng.integers(0, n_entries, size=GATHER_IDS)
        seconds[f"gather {GATHER_IDS} ids x {n_classes} classes (mean)"], _ = timed(
            lambda: [
                store.entry_statistics(version.id, ids, n_classes) for _ in range(GATHER_REPEATS)
            ]
        )
        seconds[f"gather {GATHER_IDS} ids x {n_classes} classes (mean)"] /= GATHER_REPEATS
        seconds["read all entry texts"], _ = timed(
            lambda: sum(1 for _ in store.iter_entry_texts(version.id))
        )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BLISS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        sqlite_url = f"sqlite:///{Path(folder) / 'bench.sqlite3'}"
        results["sqlite"] = run(sqlite_url, args.classes, args.entries)
    if not args.no_postgres:
        with scratch_postgres(args.postgres_url) as postgres_url:
            results["postgresql"] = run(postgres_url, args.classes, args.entries)

    rows = args.classes * args.entries
    print(f"entry statistics: {args.classes} classes x {args.entries} entries = {rows} rows")
    backends = list(results)
    operations = list(results[backends[0]])
    width = max(len(operation) for operation in operations)
    print(f"| {'operation':<{width}} | " + " | ".join(f"{b:>12}" for b in backends) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 14 for _ in backends) + "|")
    for operation in operations:
        cells = []
        for backend in backends:
            value = results[backend][operation]
            cells.append(f"{value * 1000:>9.1f} ms" if value < 1 else f"{value:>10.2f} s")
        print(f"| {operation:<{width}} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
