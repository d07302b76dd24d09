"""The indexer end to end on generated images with the tiny model, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bliss.encoders import TINY_TEST_MODEL, ClipEncoder, ModelSpec
from bliss.store import Store
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli

SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_shape_folders(root / "normal", SHAPES, 6, seed=1)
    tests = write_shape_folders(root / "test", ["circle", "cross"], 2, seed=2)
    words = root / "words.txt"
    words.write_text(
        "".join(f"{w}\n" for w in ["cat", "dog", "circle", "box", "star", "  ", "dog", "tree"] * 3)
    )
    return root, [p for paths in tests.values() for p in paths], words


def build_args(root: Path, words: Path, *extra: str) -> list:
    return [
        "index",
        "build",
        "--name",
        "shapes",
        "--from-images",
        root / "normal",
        "--model",
        TINY_TEST_MODEL,
        "--dictionary",
        f"file:{words}",
        "--default-k",
        "3",
        *extra,
    ]


def test_images_end_to_end(images, tmp_path, store_url):
    root, test_images, words = images
    data = tmp_path / "data"
    built = run_cli(*build_args(root, words, "--activate"), data_dir=data, store_url=store_url)
    assert built.code == 0, built.stderr
    assert "6 dictionary entries" in built.stdout  # de-duplicated, blank line dropped

    with Store.open(store_url) as store:
        version = store.get_version("shapes")
        classes = store.load_classes(version.id)
        assert [c.name for c in classes] == SHAPES
        assert [c.sample_count for c in classes] == [6, 6, 6]
        assert list(store.iter_entry_texts(version.id)) == [
            "cat",
            "dog",
            "circle",
            "box",
            "star",
            "tree",
        ]
        assert version.model_name == TINY_TEST_MODEL and version.embedding_dim == 64

    out_images = tmp_path / "images.jsonl"
    scored = run_cli(
        "score",
        "--local",
        "--index",
        "shapes",
        "--images",
        *test_images,
        "--k",
        "3",
        "--class-scores",
        "--output",
        out_images,
        data_dir=data,
        store_url=store_url,
    )
    assert scored.code == 0, scored.stderr
    lines = [json.loads(line) for line in out_images.read_text().splitlines()]
    assert [line["id"] for line in lines] == [str(p) for p in test_images]
    assert all(len(line["top_entries"]) == 3 for line in lines)
    assert all(set(line["class_scores"]) == set(SHAPES) for line in lines)
    assert all(line["score"] == min(line["class_scores"].values()) for line in lines)

    # Scoring the images equals scoring their embeddings: one scoring path.
    encoder = ClipEncoder.load(ModelSpec(TINY_TEST_MODEL))
    np.save(tmp_path / "emb.npy", encoder.encode_images(test_images))
    out_embeddings = tmp_path / "embeddings.jsonl"
    run_cli(
        "score",
        "--local",
        "--index",
        "shapes",
        "--embeddings",
        tmp_path / "emb.npy",
        "--k",
        "3",
        "--output",
        out_embeddings,
        data_dir=data,
        store_url=store_url,
    )
    via_embeddings = [json.loads(line) for line in out_embeddings.read_text().splitlines()]
    for a, b in zip(lines, via_embeddings, strict=True):
        assert abs(a["score"] - b["score"]) <= 1e-6
        assert a["top_entries"] == b["top_entries"]


def test_scoring_images_of_a_precomputed_version_explains_why_not(tmp_path):
    from tests.synthetic_embeddings import synthetic_world
    from tests.test_indexer_embeddings import bundle_from

    folder = bundle_from(
        synthetic_world(classes=2, entries=30, per_class=5, tests=1), tmp_path / "b"
    )
    data = tmp_path / "data"
    assert (
        run_cli(
            "index",
            "build",
            "--name",
            "p",
            "--from-embeddings",
            folder,
            "--activate",
            data_dir=data,
        ).code
        == 0
    )
    write_shape_folders(tmp_path / "imgs", ["circle"], 1)
    result = run_cli(
        "score",
        "--local",
        "--index",
        "p",
        "--images",
        tmp_path / "imgs" / "circle" / "circle_000.png",
        data_dir=data,
    )
    assert result.code == 2 and "precomputed embeddings of an unnamed model" in result.stderr


@pytest.mark.slow
def test_killed_build_resumes_and_matches_a_clean_build(images, tmp_path):
    root, _, _ = images
    words = tmp_path / "many_words.txt"
    words.write_text("".join(f"word{i} thing\n" for i in range(3000)))
    data = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "bliss.cli",
        *map(str, build_args(root, words, "--chunk-size", "300")),
    ]
    command += ["--data-dir", str(data)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    chunks = data / "builds" / "shapes"
    deadline = time.monotonic() + 120
    while len(list(chunks.glob("*/records/dictionary_chunks/*.json"))) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the build never wrote a chunk"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        (version,) = store.list_versions("shapes")
        assert version.state.value == "building"
        assert store.active_versions() == []

    resumed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the build of shapes@1" in resumed.stderr
    assert "chunks already encoded" in resumed.stderr
    assert "built shapes@1 (ready)" in resumed.stdout

    clean = tmp_path / "clean"
    assert run_cli(*build_args(root, words, "--chunk-size", "300"), data_dir=clean).code == 0
    tables = []
    for folder in (data, clean):
        with Store.open(f"sqlite:///{folder / 'bliss.sqlite3'}") as store:
            version = store.get_version("shapes", 1)
            tables.append(store.all_entry_statistics(version.id, 3, 3000))
    np.testing.assert_array_equal(tables[0][0], tables[1][0])
    np.testing.assert_array_equal(tables[0][1], tables[1][1])


def test_default_k_larger_than_the_dictionary_is_refused(images, tmp_path):
    root, _, words = images
    result = run_cli(
        "index", "build", "--name", "shapes", "--from-images", root / "normal",
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", data_dir=tmp_path,
    )  # fmt: skip
    assert result.code == 2
    assert "--default-k 10 is larger than the dictionary (6 entries)" in result.stderr
    with Store.open(f"sqlite:///{tmp_path / 'bliss.sqlite3'}") as store:
        assert store.list_versions() == []
