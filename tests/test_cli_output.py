"""What the ``bliss`` command prints, run as operators run it (subprocesses): no other
library's INFO lines unless -v, no progress bars with -q, nothing but the output on
stdout, quiet success when the reader of stdout goes away (``| head -1``), and
``python -m bliss``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bliss import __version__
from bliss.cli import main
from bliss.encoders import TINY_TEST_MODEL
from bliss.synthetic_images import write_shape_folders
from tests.test_server_process import start_serving

BLISS = str(Path(sys.executable).with_name("bliss"))
# What open_clip logs at INFO while it loads a model.
OPEN_CLIP_INFO = ("Parsing model identifier", "Instantiating model architecture")
PROGRESS_BAR = "%|"  # tqdm's "class statistics: 100%|██████████| 2/2 ..."


def bliss(*args: str | Path, environment: dict[str, str] | None = None, stdout: int = -1):
    return subprocess.run(
        [BLISS, *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        timeout=300,
    )


def to_closed_pipe(command: list[str | Path], environment: dict[str, str] | None = None):
    """Run ``command`` with its stdout a pipe nobody reads any more, like ``| head -1``
    once head has exited; returns the finished process."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [str(part) for part in command],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            timeout=300,
        )
    finally:
        os.close(writer)


def build_args(images: Path, name: str) -> list[str | Path]:
    return [
        "index", "build", "--name", name, "--from-images", images / "normal",
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{images / 'words.txt'}",
        "--default-k", "2", "--data-dir", images / "data",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Shape images, a dictionary, and a data dir holding `shapes`, built with the tiny
    model at the default verbosity (its stderr is kept in build.stderr)."""
    root = tmp_path_factory.mktemp("cli-output")
    write_shape_folders(root / "normal", ["circle", "square"], 3, seed=4)
    write_shape_folders(root / "test", ["circle", "cross"], 2, seed=5)
    (root / "words.txt").write_text("cat\ndog\nbox\nstar\n")
    queries = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)
    np.save(root / "queries.npy", queries)
    built = bliss(*build_args(root, "shapes"), "--activate")
    assert built.returncode == 0, built.stderr
    (root / "build.stderr").write_text(built.stderr)
    return root


def test_python_m_bliss_is_the_bliss_command(tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "bliss", "--version"], capture_output=True, text=True, check=True
    )
    assert ran.stdout == f"bliss {__version__}\n"
    listing = ["index", "list", "--json", "--data-dir", str(tmp_path)]
    listed = subprocess.run(
        [sys.executable, "-m", "bliss", *listing], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == bliss(*listing).stdout


@pytest.mark.slow
def test_a_model_load_shows_progress_but_no_other_librarys_info(images):
    stderr = (images / "build.stderr").read_text()
    assert "shapes@1 is ready" in stderr  # bliss's own INFO
    assert PROGRESS_BAR in stderr
    assert not [line for line in OPEN_CLIP_INFO if line in stderr]


@pytest.mark.slow
def test_quiet_shows_no_progress_bar_and_no_info(images):
    built = bliss("-q", *build_args(images, "quiet"))
    assert built.returncode == 0, built.stderr
    assert PROGRESS_BAR not in built.stderr
    assert "is ready" not in built.stderr
    assert not [line for line in OPEN_CLIP_INFO if line in built.stderr]


@pytest.mark.slow
def test_verbose_shows_other_librarys_info(images):
    scored = bliss(
        "-v", "score", "--local", "--index", "shapes", "--images", *sorted(images.glob("test/*/*")),
        "--data-dir", images / "data",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert all(line in scored.stderr for line in OPEN_CLIP_INFO)


@pytest.mark.slow
def test_stdout_holds_json_and_nothing_else(images):
    test_images = sorted(images.glob("test/*/*"))
    scored = bliss(
        "score", "--local", "--index", "shapes", "--images", *test_images,
        "--data-dir", images / "data",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    lines = [json.loads(line) for line in scored.stdout.splitlines()]
    assert [line["id"] for line in lines] == [str(path) for path in test_images]
    assert not [line for line in OPEN_CLIP_INFO if line in scored.stderr]
    for command in (["index", "list", "--json"], ["index", "describe", "shapes", "--json"]):
        listed = bliss(*command, "--data-dir", images / "data")
        assert listed.returncode == 0, listed.stderr
        json.loads(listed.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_listing_into_a_closed_pipe_ends_quietly(images, buffered):
    # Buffered, the write fails when bliss flushes at the end; unbuffered, at once.
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        environment["PYTHONUNBUFFERED"] = "1"
    listed = to_closed_pipe([BLISS, "index", "list", "--data-dir", images / "data"], environment)
    assert (listed.returncode, listed.stderr) == (0, "")


@pytest.mark.slow
def test_scoring_into_a_closed_pipe_ends_quietly(images):
    data = images / "data"
    local = to_closed_pipe(
        [BLISS, "-q", "score", "--local", "--index", "shapes", "--embeddings",
         images / "queries.npy", "--data-dir", data],
    )  # fmt: skip
    assert (local.returncode, local.stderr) == (0, "")
    process, port, _ = start_serving(data)
    try:
        remote = to_closed_pipe(
            [BLISS, "-q", "score", "--server", f"127.0.0.1:{port}", "--embeddings",
             images / "queries.npy"],
        )  # fmt: skip
    finally:
        process.kill()
        process.wait()
    assert (remote.returncode, remote.stderr) == (0, "")


def test_a_broken_pipe_that_is_not_stdout_stays_an_error(monkeypatch, capsys):
    def broken(args) -> int:
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr("bliss.client.commands.run_health", broken)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        main(["health", "--server", "127.0.0.1:1"])
