"""Serving artifacts: mapped (shared by processes), verified at build/activation, not at start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bliss.errors import InvalidInputError
from bliss.serving_artifacts import ENTRY_MEAN, TEXTS, artifacts_directory
from bliss.store import Store
from bliss.version_loader import load_scorer
from tests.cli_runner import run_cli
from tests.serving_fixtures import build_from_embeddings
from tests.synthetic_embeddings import synthetic_world


@pytest.fixture
def built(tmp_path):
    world = synthetic_world(classes=3, entries=500, per_class=12, tests=8, dim=32)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data, activate=False)
    return world, data


def _version_files(data: Path) -> tuple[Path, Path]:
    faiss_file = data / "indexes" / "demo" / "v1.faiss"
    return faiss_file, artifacts_directory(faiss_file)


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_verify_and_activate_catch_a_corrupted_artifact(built):
    _, data = built
    verified = run_cli("index", "verify", "demo", "--version", "1", data_dir=data)
    assert verified.code == 0, verified.stderr
    assert "demo@1 verified" in verified.stdout and "match the store" in verified.stdout
    _, directory = _version_files(data)
    _flip_last_byte(directory / ENTRY_MEAN)  # same size: only a full hash sees it
    for command in (("verify",), ("activate",)):
        result = run_cli("index", *command, "demo", "--version", "1", data_dir=data)
        assert result.code != 0
        assert ENTRY_MEAN in result.stderr and "rebuild the version" in result.stderr


def test_start_up_reads_no_checksum_but_checks_sizes(built, monkeypatch):
    world, data = built
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        version = store.get_version("demo", 1)

        def refuse(path: Path) -> str:
            raise AssertionError(f"start-up hashed {path}")

        monkeypatch.setattr("bliss.serving_artifacts.file_sha256", refuse)
        monkeypatch.setattr("bliss.dictionary_index.file_sha256", refuse)
        scorer = load_scorer(store, version, data)
        assert scorer.score(world.test).score.shape == (8,)
        _, directory = _version_files(data)
        with open(directory / TEXTS, "ab") as blob:
            blob.write(b"x")
        with pytest.raises(InvalidInputError, match="truncated or replaced"):
            load_scorer(store, version, data)


def test_a_manifest_the_store_did_not_record_is_refused(built):
    _, data = built
    _, directory = _version_files(data)
    manifest = directory / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format":  1'))
    with (
        Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store,
        pytest.raises(InvalidInputError, match="differs from the one the store recorded"),
    ):
        load_scorer(store, store.get_version("demo", 1), data)


SCORING_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from pathlib import Path
    from bliss.store import Store
    from bliss.version_loader import load_scorer

    data = Path(sys.argv[1])
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        scorer = load_scorer(store, store.get_version("demo", 1), data)
    queries = np.random.default_rng(0).standard_normal((64, scorer.dim))
    scorer.score(queries, k=50)
    # Touch every statistics row too, as a long-running server eventually does.
    scorer.statistics.gather(np.arange(scorer.dictionary_size)[None, :])
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def _mapped_memory(pid: int, folder: Path) -> dict[str, int]:
    """Shared and private kB of the mappings of files under ``folder`` in process ``pid``."""
    totals = {"Shared_Clean": 0, "Private_Clean": 0, "Private_Dirty": 0, "Rss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(str(folder))
        elif inside and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1])
    return totals


def test_two_processes_share_one_copy_of_a_version(tmp_path):
    world = synthetic_world(classes=4, entries=30_000, per_class=40, tests=1, dim=64)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    faiss_file, directory = _version_files(data)
    mapped_kb = (
        faiss_file.stat().st_size + sum(p.stat().st_size for p in directory.iterdir())
    ) // 1024
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SCORING_PROCESS, str(data)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        usage = [_mapped_memory(process.pid, faiss_file.parent) for process in processes]
    finally:
        for process in processes:
            process.communicate("done\n", timeout=60)
    for memory in usage:
        # Every page of the version's files each process touched is one shared page.
        assert memory["Private_Dirty"] == 0, usage
        assert memory["Private_Clean"] <= 0.05 * mapped_kb, usage
        assert memory["Shared_Clean"] >= 0.5 * mapped_kb, usage
