"""`bliss index extend` equals a from-scratch build of the union, doing only the new work."""

from __future__ import annotations

import numpy as np
import pytest

from bliss.embedding_bundle import write_bundle
from bliss.store import Store
from bliss.version_loader import load_scorer
from tests.cli_runner import run_cli
from tests.synthetic_embeddings import SyntheticWorld, synthetic_world

BASE_ENTRIES = 260
BASE_IMAGES = 30  # of each class's 50


def _bundle(world: SyntheticWorld, folder, entries: slice, images: np.ndarray) -> None:
    write_bundle(
        folder,
        dictionary_texts=[f"entry {i}" for i in range(len(world.dictionary))][entries],
        dictionary=world.dictionary[entries],
        class_names=[f"class {i}" for i in range(len(world.label_embeddings))],
        class_text=world.label_embeddings,
        normal=world.normal[images],
        normal_labels=world.normal_labels[images],
    )


def _extension(world: SyntheticWorld, folder, images: np.ndarray) -> None:
    folder.mkdir()
    texts = [f"entry {i}" for i in range(len(world.dictionary))]
    # Two entries the base already has: extend skips them.
    added = list(range(BASE_ENTRIES - 2, len(texts)))
    (folder / "dictionary.txt").write_text("".join(texts[i] + "\n" for i in added))
    np.save(folder / "dictionary.npy", world.dictionary[added])
    labels = world.normal_labels[images]
    (folder / "classes.txt").write_text("class 2\nclass 0\n")  # a subset, in another order
    keep = np.isin(labels, [0, 2])
    np.save(folder / "normal.npy", world.normal[images][keep])
    np.save(folder / "normal_labels.npy", np.where(labels[keep] == 2, 0, 1))


def _index_build(name: str, bundle, data, mode: str, kind: str) -> None:
    built = run_cli(
        "index", "build", "--name", name, "--from-embeddings", bundle, "--statistics-mode", mode,
        "--index-kind", kind, "--nlist", "4", "--nprobe", "4", data_dir=data,
    )  # fmt: skip
    assert built.code == 0, built.stderr


@pytest.mark.parametrize(
    ("mode", "kind"), [("table", "flat"), ("moments", "flat"), ("table", "ivf")]
)
def test_extend_equals_a_build_of_the_union(tmp_path, mode, kind):
    world = synthetic_world(classes=3, entries=400, per_class=50, tests=20, dim=40, seed=11)
    rank = np.concatenate([np.arange(np.sum(world.normal_labels == c)) for c in range(3)])
    order = np.argsort(world.normal_labels, kind="stable")
    first = np.zeros(len(world.normal), dtype=bool)
    first[order] = rank < BASE_IMAGES
    data = tmp_path / "data"
    _bundle(world, tmp_path / "base", slice(0, BASE_ENTRIES), np.flatnonzero(first))
    union = first | np.isin(world.normal_labels, [0, 2])  # class 1 gets no new images
    _bundle(world, tmp_path / "union", slice(None), np.flatnonzero(union))
    _extension(world, tmp_path / "extension", np.flatnonzero(~first))
    _index_build("grown", tmp_path / "base", data, mode, kind)
    _index_build("union", tmp_path / "union", data, mode, kind)

    extended = run_cli(
        "index", "extend", "grown", "--version", "1", "--from-embeddings",
        tmp_path / "extension", "--activate", data_dir=data,
    )  # fmt: skip
    assert extended.code == 0, extended.stderr
    assert "built grown@2 (active, from grown@1): 400 dictionary entries" in extended.stdout
    again = run_cli(
        "index", "extend", "grown", "--version", "1", "--from-embeddings",
        tmp_path / "extension", data_dir=data,
    )  # fmt: skip
    assert "unchanged grown@2" in again.stdout

    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        grown, union = store.get_version("grown", 2), store.get_version("union", 1)
        assert grown.parent_version_id == store.get_version("grown", 1).id
        assert [c.sample_count for c in store.load_classes(grown.id)] == [50, 30, 50]
        scorers = [load_scorer(store, version, data, verify=True) for version in (grown, union)]
    assert scorers[0].entry_texts(np.arange(400)[None, :]) == scorers[1].entry_texts(
        np.arange(400)[None, :]
    )
    for k, lam in [(10, 0.5), (4, 1.0)]:
        grown_batch, union_batch = (s.score(world.test, k=k, lam=lam) for s in scorers)
        np.testing.assert_array_equal(grown_batch.top_entry_ids, union_batch.top_entry_ids)
        np.testing.assert_allclose(grown_batch.score, union_batch.score, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            grown_batch.class_scores, union_batch.class_scores, rtol=1e-9, atol=1e-12
        )


def test_extend_refuses_unknown_classes_and_empty_folders(tmp_path):
    world = synthetic_world(classes=2, entries=50, per_class=5, tests=1, dim=16)
    data = tmp_path / "data"
    _bundle(world, tmp_path / "base", slice(None), np.arange(len(world.normal)))
    _index_build("demo", tmp_path / "base", data, "table", "flat")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("index", "extend", "demo", "--version", "1", "--from-embeddings", empty,
                     data_dir=data)  # fmt: skip
    assert result.code != 0 and "adds nothing" in result.stderr
    (empty / "classes.txt").write_text("class 9\n")
    np.save(empty / "normal.npy", world.normal[:2])
    np.save(empty / "normal_labels.npy", np.zeros(2, dtype=np.int64))
    result = run_cli("index", "extend", "demo", "--version", "1", "--from-embeddings", empty,
                     data_dir=data)  # fmt: skip
    assert result.code != 0 and "'class 9', not a class of the version" in result.stderr
