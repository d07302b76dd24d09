"""A killed build resumes into exactly what an uninterrupted build makes, whatever changed.

"Killed" is simulated in-process: an exception that no handler catches is raised just
before the n-th durable write (a workspace output, a stage record or a store write), for
n drawn at random, and the build is then rerun with other chunk and batch sizes.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from bliss.encoders import TINY_TEST_MODEL
from bliss.indexer import build_run
from bliss.indexer.workspace import WORKSPACE_FORMAT, BuildWorkspace
from bliss.store import Store
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli

CLASSES = ["circle", "square", "triangle"]
ENTRIES = 240


class Killed(BaseException):
    """Not an Exception: nothing in bliss catches it, as nothing survives a SIGKILL."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_shape_folders(root / "normal", CLASSES, 7, seed=3)
    words = root / "words.txt"
    words.write_text("".join(f"word{i} thing\n" for i in range(ENTRIES)))
    return root / "normal", words


def build(inputs, data: Path, *, chunk: int, batch: int, extra: tuple = ()):
    images, words = inputs
    return run_cli(
        "index", "build", "--name", "shapes", "--from-images", images,
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--default-k", "5",
        "--chunk-size", str(chunk), "--batch-size", str(batch),
        "--calibration-fraction", "0.3", *extra, data_dir=data,
    )  # fmt: skip


def result_of(data: Path) -> dict:
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        (version,) = store.list_versions("shapes")
        classes = store.load_classes(version.id)
        mean, std = store.all_entry_statistics(version.id, len(classes), version.dictionary_size)
        calibration = store.load_calibration(version.id)
        return {
            "state": version.state.value,
            "faiss": version.faiss_checksum,
            "artifacts": version.artifacts_checksum,
            "classes": [(c.name, c.sample_count, c.label_mean, c.label_std) for c in classes],
            "labels": np.stack([c.label_embedding for c in classes]),
            "mean": mean,
            "std": std,
            "calibration": calibration.sorted_scores,
            "texts": list(store.iter_entry_texts(version.id)),
        }


def assert_identical(a: dict, b: dict) -> None:
    for key in ("state", "faiss", "artifacts", "classes", "texts"):
        assert a[key] == b[key], key
    for key in ("labels", "mean", "std"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["calibration"].keys() == b["calibration"].keys()
    for mode, scores in a["calibration"].items():
        np.testing.assert_array_equal(scores, b["calibration"][mode])


class KillSwitch:
    """Raises Killed just before the n-th durable write of a build."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None) -> None:
        self.at = at
        self.writes = 0
        for owner, name in (
            (BuildWorkspace, "_finish"),
            (BuildWorkspace, "mark"),
            (Store, "write_entries"),
            (Store, "write_classes"),
            (Store, "write_entry_statistics"),
            (Store, "set_faiss_file"),
            (Store, "set_artifacts"),
            (Store, "write_calibration"),
        ):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, method):
        def counted(*args, **kwargs):
            self.writes += 1
            if self.writes == self.at:
                raise Killed(f"killed before write {self.at}")
            return method(*args, **kwargs)

        return counted


@pytest.fixture
def small_store_blocks(monkeypatch):
    # Several statistics transactions, so a kill can land between two of them.
    monkeypatch.setattr(build_run, "STATISTICS_BLOCK_ROWS", 3 * 50)


@pytest.mark.slow
def test_killed_at_random_points_and_resumed_with_other_sizes_is_identical(
    inputs, tmp_path, monkeypatch, small_store_blocks
):
    settings = [(40, 16), (64, 7), (500, 32)]  # (chunk size, batch size)
    clean, writes = {}, {}
    for chunk, batch in settings:
        counter = KillSwitch(monkeypatch, at=None)
        assert build(inputs, tmp_path / f"clean-{chunk}", chunk=chunk, batch=batch).code == 0
        clean[chunk, batch] = result_of(tmp_path / f"clean-{chunk}")
        writes[chunk, batch] = counter.writes
        monkeypatch.undo()
        monkeypatch.setattr(build_run, "STATISTICS_BLOCK_ROWS", 3 * 50)
    generator = random.Random(12)
    for trial in range(6):
        data = tmp_path / f"trial-{trial}"
        first, then = generator.sample(settings, 2)
        kill_at = generator.randint(1, writes[first])
        KillSwitch(monkeypatch, at=kill_at)
        with pytest.raises(Killed):
            build(inputs, data, chunk=first[0], batch=first[1])
        monkeypatch.undo()
        monkeypatch.setattr(build_run, "STATISTICS_BLOCK_ROWS", 3 * 50)
        resumed = build(inputs, data, chunk=then[0], batch=then[1])
        assert resumed.code == 0, (trial, kill_at, resumed.stderr)
        assert_identical(result_of(data), clean[then])


def test_a_chunk_size_change_redoes_the_chunks_it_cannot_reuse(
    inputs, tmp_path, monkeypatch, caplog
):
    """The reported failure: 500-item chunks, killed, rerun with the default size."""
    data = tmp_path / "data"
    KillSwitch(monkeypatch, at=4)  # dictionary.txt, then 3 of the dictionary's chunks
    with pytest.raises(Killed):
        build(inputs, data, chunk=50, batch=16)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        resumed = build(inputs, data, chunk=64, batch=16)
    assert resumed.code == 0, resumed.stderr
    assert "resuming the build of shapes@1" in caplog.text
    assert "already encoded" not in caplog.text  # no 50-item chunk fits 64-item boundaries
    assert build(inputs, tmp_path / "clean", chunk=64, batch=16).code == 0
    assert_identical(result_of(data), result_of(tmp_path / "clean"))


def test_matching_chunks_are_reused_and_a_damaged_one_is_redone(
    inputs, tmp_path, monkeypatch, caplog
):
    data = tmp_path / "data"
    KillSwitch(monkeypatch, at=5)
    with pytest.raises(Killed):
        build(inputs, data, chunk=50, batch=16)
    monkeypatch.undo()
    (workspace,) = (data / "builds" / "shapes").iterdir()
    chunks = sorted((workspace / "dictionary_chunks").glob("*.npy"))
    assert len(chunks) == 4  # 3 with their records; the 4th was killed before its record
    with open(chunks[1], "r+b") as damaged:
        damaged.seek(-4, 2)
        damaged.write(b"\0\0\0\1")
    with caplog.at_level(logging.INFO):
        resumed = build(inputs, data, chunk=50, batch=16)
    assert resumed.code == 0, resumed.stderr
    assert "encode dictionary: resuming, 2 of 5 chunks already encoded" in caplog.text
    assert "its checksum changed" in caplog.text
    assert build(inputs, tmp_path / "clean", chunk=50, batch=16).code == 0
    assert_identical(result_of(data), result_of(tmp_path / "clean"))


def test_normal_image_chunks_are_checked_row_by_row(inputs, tmp_path, monkeypatch, caplog):
    """A chunk file with too few rows (the other reported failure) is never assembled."""
    data = tmp_path / "data"
    KillSwitch(monkeypatch, at=10)  # texts, 6 chunks and the dictionary, a class chunk: before
    # the record of that class's file
    with pytest.raises(Killed):
        build(inputs, data, chunk=40, batch=16)
    monkeypatch.undo()
    (workspace,) = (data / "builds" / "shapes").iterdir()
    (chunk,) = (workspace / "normals" / "class_00000_chunks").glob("*.npy")
    record = workspace / "records" / "normals" / "class_00000_chunks" / (chunk.name + ".json")
    np.save(chunk, np.load(chunk)[:3])  # fewer rows, with a record rewritten to match
    facts = json.loads(record.read_text())
    from bliss.checksums import file_sha256

    record.write_text(json.dumps({**facts, "sha256": file_sha256(chunk), "rows": 3}))
    with caplog.at_level(logging.INFO):
        resumed = build(inputs, data, chunk=40, batch=16)
    assert resumed.code == 0, resumed.stderr
    assert build(inputs, tmp_path / "clean", chunk=40, batch=16).code == 0
    assert_identical(result_of(data), result_of(tmp_path / "clean"))
    assert "rows where 7 are expected" in caplog.text


def test_an_untrusted_workspace_is_discarded_with_one_line(inputs, tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    KillSwitch(monkeypatch, at=6)
    with pytest.raises(Killed):
        build(inputs, data, chunk=50, batch=16)
    monkeypatch.undo()
    (workspace,) = (data / "builds" / "shapes").iterdir()
    identity = workspace / "workspace.json"
    identity.write_text(json.dumps({"format": WORKSPACE_FORMAT - 1, "build": "x"}))
    with caplog.at_level(logging.INFO):
        resumed = build(inputs, data, chunk=50, batch=16)
    assert resumed.code == 0, resumed.stderr
    (line,) = [line for line in caplog.messages if "discarding workspace" in line]
    assert f"it has format {WORKSPACE_FORMAT - 1}" in line and "starts over" in line
    assert build(inputs, tmp_path / "clean", chunk=50, batch=16).code == 0
    assert_identical(result_of(data), result_of(tmp_path / "clean"))


def test_statistics_recomputed_another_way_rewrite_every_store_row(inputs, tmp_path, monkeypatch):
    """Store rows from one statistics path are never continued with another's."""
    data = tmp_path / "data"
    monkeypatch.setattr(build_run, "STATISTICS_BLOCK_ROWS", 3 * 50)
    # Kill inside the store rows stage: after the first statistics block.
    original = Store.write_entry_statistics
    blocks = []

    def killed_after_one_block(store, *args, **kwargs):
        if blocks:
            raise Killed("killed mid store rows")
        blocks.append(args[1])
        return original(store, *args, **kwargs)

    monkeypatch.setattr(Store, "write_entry_statistics", killed_after_one_block)
    with pytest.raises(Killed):
        build(inputs, data, chunk=50, batch=16, extra=("--statistics-path", "direct"))
    monkeypatch.undo()
    monkeypatch.setattr(build_run, "STATISTICS_BLOCK_ROWS", 3 * 50)
    resumed = build(inputs, data, chunk=50, batch=16, extra=("--statistics-path", "moments"))
    assert resumed.code == 0, resumed.stderr
    clean = tmp_path / "clean"
    assert (
        build(inputs, clean, chunk=50, batch=16, extra=("--statistics-path", "moments")).code == 0
    )
    assert_identical(result_of(data), result_of(clean))
