"""`bliss index build --from-embeddings` then `bliss score --local`, on both store backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bliss.embedding_bundle import write_bundle
from bliss.scoring import ScoringMode
from bliss.store import Store, VersionState
from tests.cli_runner import run_cli
from tests.naive_bliss import naive_reference
from tests.synthetic_embeddings import SyntheticWorld, synthetic_world


def bundle_from(world: SyntheticWorld, folder, *, class_names=None):
    write_bundle(
        folder,
        dictionary_texts=[f"entry {i}" for i in range(len(world.dictionary))],
        dictionary=world.dictionary,
        class_names=class_names or [f"class {i}" for i in range(len(world.label_embeddings))],
        class_text=world.label_embeddings,
        normal=world.normal,
        normal_labels=world.normal_labels,
    )
    return folder


@pytest.fixture
def world():
    return synthetic_world(classes=4, entries=300, per_class=30, tests=16, seed=3)


def test_build_then_local_score_reproduces_the_spec(world, tmp_path, store_url):
    bundle = bundle_from(world, tmp_path / "bundle")
    built = run_cli(
        "index",
        "build",
        "--name",
        "demo",
        "--from-embeddings",
        bundle,
        "--activate",
        data_dir=tmp_path / "data",
        store_url=store_url,
    )
    assert built.code == 0, built.stderr
    assert "built demo@1 (active)" in built.stdout
    np.save(tmp_path / "test.npy", world.test)

    for mode, k, lam in [
        ("bliss", 10, 0.5),
        ("bliss", 3, 0.75),
        ("ic", 10, 0.5),
        ("ic_raw", 5, 0.5),
    ]:
        output = tmp_path / f"{mode}-{k}.jsonl"
        scored = run_cli(
            "score",
            "--local",
            "--index",
            "demo",
            "--embeddings",
            tmp_path / "test.npy",
            "--mode",
            mode,
            "--k",
            str(k),
            "--lambda",
            str(lam),
            "--output",
            output,
            "--batch-size",
            "5",
            data_dir=tmp_path / "data",
            store_url=store_url,
        )
        assert scored.code == 0, scored.stderr
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        expected = naive_reference(world, k, lam, mode)
        assert [line["id"] for line in lines] == [f"test.npy#{i}" for i in range(len(world.test))]
        for line, reference in zip(lines, expected, strict=True):
            assert abs(line["score"] - reference["score"]) <= 1e-5
            assert abs(line["internal_class_score"] - reference["ic"]) <= 1e-5
            assert abs(line["external_text_score"] - reference["et"]) <= 1e-5
            assert line["nearest_class"] == f"class {reference['nearest']}"
            assert [e["text"] for e in line["top_entries"]] == [
                f"entry {j}" for j in reference["top"]
            ]
            assert line["index_version"] == "demo@1"


def test_rerunning_a_finished_build_does_nothing(world, tmp_path, store_url):
    bundle = bundle_from(world, tmp_path / "bundle")
    args = ("index", "build", "--name", "demo", "--from-embeddings", bundle)
    first = run_cli(*args, data_dir=tmp_path / "data", store_url=store_url)
    again = run_cli(*args, data_dir=tmp_path / "data", store_url=store_url)
    assert first.code == again.code == 0
    assert "unchanged demo@1 (ready)" in again.stdout
    with Store.open(store_url) as store:
        assert [v.version for v in store.list_versions("demo")] == [1]
    # Only the build workspace's absence proves nothing is left half-done.
    assert not (tmp_path / "data" / "builds").exists()


def test_new_inputs_make_a_new_version_and_activation_switches(world, tmp_path, store_url):
    data = tmp_path / "data"
    first = bundle_from(world, tmp_path / "b1")
    other = synthetic_world(classes=4, entries=300, per_class=30, tests=4, seed=9)
    second = bundle_from(other, tmp_path / "b2")
    for bundle in (first, second):
        result = run_cli(
            "index",
            "build",
            "--name",
            "demo",
            "--from-embeddings",
            bundle,
            "--activate",
            data_dir=data,
            store_url=store_url,
        )
        assert result.code == 0, result.stderr
    with Store.open(store_url) as store:
        states = {v.version: v.state for v in store.list_versions("demo")}
    assert states == {1: VersionState.RETIRED, 2: VersionState.ACTIVE}
    rollback = run_cli(
        "index", "activate", "demo", "--version", "1", data_dir=data, store_url=store_url
    )
    assert rollback.code == 0 and "demo@1 is active" in rollback.stdout
    listing = run_cli("index", "list", "--json", data_dir=data, store_url=store_url)
    assert {(v["version"], v["state"]) for v in json.loads(listing.stdout)} == {
        (1, "active"),
        (2, "retired"),
    }
    shown = run_cli("index", "show", "demo", "--json", data_dir=data, store_url=store_url)
    description = json.loads(shown.stdout)
    assert description["label"] == "demo@1"
    assert [c["normal_images"] for c in description["classes"]] == [30, 30, 30, 30]


def test_statistics_paths_give_the_same_version_contents(world, tmp_path):
    bundle = bundle_from(world, tmp_path / "bundle")
    tables = {}
    for path in ("direct", "moments"):
        data = tmp_path / path
        result = run_cli(
            "index",
            "build",
            "--name",
            "demo",
            "--from-embeddings",
            bundle,
            "--statistics-path",
            path,
            data_dir=data,
        )
        assert result.code == 0, result.stderr
        with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
            version = store.get_version("demo", 1)
            tables[path] = store.all_entry_statistics(version.id, 4, 300)
    np.testing.assert_allclose(tables["direct"][0], tables["moments"][0], atol=1e-12)
    np.testing.assert_allclose(tables["direct"][1], tables["moments"][1], atol=1e-10)


def _score_lines(tmp_path, data, store_url, *extra):
    output = tmp_path / "out.jsonl"
    result = run_cli(
        "score", "--local", "--index", "demo", "--embeddings", tmp_path / "test.npy",
        "--output", output, *extra, data_dir=data, store_url=store_url,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_calibration_gives_normal_quantiles(world, tmp_path, store_url):
    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    built = run_cli(
        "index", "build", "--name", "demo", "--from-embeddings", bundle, "--activate",
        "--calibration-fraction", "0.3", data_dir=data, store_url=store_url,
    )  # fmt: skip
    assert built.code == 0, built.stderr
    np.save(tmp_path / "test.npy", world.test)
    with Store.open(store_url) as store:
        calibration = store.load_calibration(store.get_version("demo").id)
        classes = store.load_classes(store.get_version("demo").id)
    assert calibration.sample_count == 4 * 9  # round(0.3 * 30) held out of each class
    assert [c.sample_count for c in classes] == [21, 21, 21, 21]

    lines = _score_lines(tmp_path, data, store_url)
    reference = calibration.sorted_scores[ScoringMode.BLISS]
    for line in lines:
        expected = np.count_nonzero(reference < line["score"]) / len(reference)
        assert line["normal_quantile"] == pytest.approx(expected)
    assert len({line["normal_quantile"] for line in lines}) > 3

    # bliss quantiles only hold at the K and lambda they were computed with
    assert all(
        "normal_quantile" not in line
        for line in _score_lines(tmp_path, data, store_url, "--lambda", "2")
    )
    ic_lines = _score_lines(tmp_path, data, store_url, "--mode", "ic", "--k", "3")
    assert all("normal_quantile" in line for line in ic_lines)


def test_store_and_memory_statistics_paths_agree(world, tmp_path, store_url):
    bundle = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    run_cli("index", "build", "--name", "demo", "--from-embeddings", bundle, "--activate",
            data_dir=data, store_url=store_url)  # fmt: skip
    np.save(tmp_path / "test.npy", world.test)
    in_memory = _score_lines(tmp_path, data, store_url, "--class-scores")
    from_store = _score_lines(
        tmp_path, data, store_url, "--class-scores", "--memory-budget-mib", "0"
    )
    assert in_memory == from_store
