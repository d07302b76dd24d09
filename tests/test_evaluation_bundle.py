"""``--embeddings-dir`` (the indexer's bundle plus test files) and ``bliss diagnose``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bliss.embedding_bundle import write_bundle
from bliss.evaluation.runner import run_setting, search_test_split
from bliss.evaluation.splits import Setting, Trial
from bliss.evaluation.sweeps import SweepConfig
from bliss.evaluation.synthetic import SYNTHETIC_DICTIONARY, SyntheticSpec, synthetic_benchmark
from tests.cli_runner import run_cli

KEPT_CLASSES = 6  # the bundle lists the first six classes; the others' test images get -1


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_benchmark(SyntheticSpec(train_per_class=40, test_per_class=20, seed=3))


@pytest.fixture
def bundle(synthetic, tmp_path):
    benchmark, dictionaries = synthetic
    dictionary = dictionaries[SYNTHETIC_DICTIONARY]
    kept = benchmark.train_labels < KEPT_CLASSES
    folder = tmp_path / "bundle"
    write_bundle(
        folder,
        dictionary_texts=dictionary.texts,
        dictionary=dictionary.embeddings,
        class_names=benchmark.class_names[:KEPT_CLASSES],
        class_text=benchmark.class_text[:KEPT_CLASSES],
        normal=benchmark.train[kept],
        normal_labels=benchmark.train_labels[kept],
    )
    return folder


def add_test_split(folder, benchmark) -> None:
    labels = np.where(benchmark.test_labels < KEPT_CLASSES, benchmark.test_labels, -1)
    np.save(folder / "test.npy", benchmark.test)
    np.save(folder / "test_labels.npy", labels)


def test_a_plain_indexer_bundle_asks_for_the_test_files(bundle, tmp_path):
    result = run_cli("eval", "folder", "--embeddings-dir", bundle, data_dir=tmp_path / "d")
    assert result.code == 2
    assert "test.npy" in result.stderr and "test_labels.npy" in result.stderr


def test_bad_test_labels_are_named(bundle, synthetic, tmp_path):
    add_test_split(bundle, synthetic[0])
    labels = np.load(bundle / "test_labels.npy")
    labels[7] = KEPT_CLASSES
    np.save(bundle / "test_labels.npy", labels)
    result = run_cli("eval", "folder", "--embeddings-dir", bundle, data_dir=tmp_path / "d")
    assert result.code == 2 and "row 7" in result.stderr


def test_bundle_evaluation_equals_the_runner_on_the_same_embeddings(bundle, synthetic, tmp_path):
    benchmark, dictionaries = synthetic
    add_test_split(bundle, benchmark)
    out = tmp_path / "out"
    result = run_cli(
        "eval", "folder", "--embeddings-dir", bundle, "--out", out, data_dir=tmp_path / "d"
    )
    assert result.code == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    assert report["dictionaries"]["bundle"]["size"] == len(dictionaries[SYNTHETIC_DICTIONARY].texts)
    (setting,) = report["settings"]
    assert setting["trials"][0]["normal_classes"] == list(benchmark.class_names[:KEPT_CLASSES])

    config = SweepConfig(dictionaries=(SYNTHETIC_DICTIONARY,))
    searches = {
        SYNTHETIC_DICTIONARY: search_test_split(
            benchmark.test, dictionaries[SYNTHETIC_DICTIONARY], 10
        )
    }
    expected = run_setting(
        benchmark,
        dictionaries,
        searches,
        Setting("s", "S", (Trial(0, tuple(range(KEPT_CLASSES))),)),
        config,
        seed=0,
    )
    for row, reference in zip(setting["rows"], expected.rows, strict=True):
        assert row["per_trial"][0] == pytest.approx(reference.per_trial[0].as_dict(), abs=1e-6)


def test_diagnose_prints_the_text_clustering_of_a_stored_version(bundle, synthetic, tmp_path):
    benchmark, dictionaries = synthetic
    data = tmp_path / "data"
    store_url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    built = run_cli(
        "index", "build", "--name", "demo", "--from-embeddings", bundle, "--activate",
        data_dir=data, store_url=store_url,
    )  # fmt: skip
    assert built.code == 0, built.stderr

    dictionary = dictionaries[SYNTHETIC_DICTIONARY].embeddings.astype(np.float64)
    labels = benchmark.class_text[:KEPT_CLASSES].astype(np.float64)
    kept = benchmark.train_labels < KEPT_CLASSES
    own_label = labels[benchmark.train_labels[kept]]
    naive_text_text = (labels @ dictionary.T).mean()
    naive_image_label = np.einsum("nd,nd->n", benchmark.train[kept], own_label).mean()

    shown = run_cli("diagnose", "--index", "demo", "--store-url", store_url, data_dir=data)
    assert shown.code == 0, shown.stderr
    text_text = float(re.search(r"mean text-text similarity .*: ([0-9.]+)", shown.stdout)[1])
    image_label = float(re.search(r"mean image-label similarity .*: +([0-9.]+)", shown.stdout)[1])
    gap = float(re.search(r"gap \(text-text minus image-label\): ([+-][0-9.]+)", shown.stdout)[1])
    assert text_text == pytest.approx(naive_text_text, abs=1e-4)
    assert image_label == pytest.approx(naive_image_label, abs=1e-4)
    assert gap == pytest.approx(naive_text_text - naive_image_label, abs=2e-4)
    assert "shows the text clustering effect" in shown.stdout
    for name in benchmark.class_names[:KEPT_CLASSES]:
        assert re.search(rf"^{name} +40 ", shown.stdout, re.MULTILINE)

    as_json = run_cli(
        "diagnose", "--index", "demo", "--json", "--store-url", store_url, data_dir=data
    )
    figures = json.loads(as_json.stdout)
    assert figures["index"] == "demo@1" and figures["exact_dictionary_vectors"] is True
    assert figures["text_text_similarity"] == pytest.approx(naive_text_text, abs=1e-6)
    assert figures["image_label_similarity"] == pytest.approx(naive_image_label, abs=1e-6)


def test_diagnose_names_a_missing_index(tmp_path):
    store_url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    assert run_cli("db", "upgrade", data_dir=tmp_path, store_url=store_url).code == 0
    shown = run_cli("diagnose", "--index", "nope", "--store-url", store_url, data_dir=tmp_path)
    assert shown.code == 2 and "nope" in shown.stderr
