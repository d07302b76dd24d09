"""Every malformed input gives one clear error line and leaves no version behind."""

from __future__ import annotations

import numpy as np
import pytest

from bliss.store import Store
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli
from tests.synthetic_embeddings import synthetic_world
from tests.test_indexer_embeddings import bundle_from


def _nan_row(folder):
    normal = np.load(folder / "normal.npy")
    normal[7, 3] = np.nan
    np.save(folder / "normal.npy", normal)


def _drop_dictionary_line(folder):
    lines = (folder / "dictionary.txt").read_text().splitlines()
    (folder / "dictionary.txt").write_text("\n".join(lines[:-1]) + "\n")


def _other_dimension(folder):
    np.save(folder / "normal.npy", np.load(folder / "normal.npy")[:, :-2])


def _label_out_of_range(folder):
    labels = np.load(folder / "normal_labels.npy")
    labels[4] = 9
    np.save(folder / "normal_labels.npy", labels)


def _empty_class(folder):
    labels = np.load(folder / "normal_labels.npy")
    labels[labels == 2] = 1
    np.save(folder / "normal_labels.npy", labels)


def _duplicate_class(folder):
    (folder / "classes.txt").write_text("cat\ndog\ncat\n")


def _missing_file(folder):
    (folder / "class_text.npy").unlink()


def _pickled_labels(folder):
    np.save(folder / "normal_labels.npy", np.array(["a"] * 30, dtype=object), allow_pickle=True)


def _infinite_dictionary_row(folder):
    dictionary = np.load(folder / "dictionary.npy")
    dictionary[11] = np.inf
    np.save(folder / "dictionary.npy", dictionary)


CASES = {
    "missing file": (_missing_file, "lacks class_text.npy"),
    "nan row": (_nan_row, "normal.npy row 7 contains NaN"),
    "inf dictionary row": (_infinite_dictionary_row, "dictionary.npy row 11 contains NaN, inf"),
    "rows vs lines": (
        _drop_dictionary_line,
        "dictionary.npy has 120 rows but dictionary.txt has 119",
    ),
    "dimension": (_other_dimension, "normal.npy has dimension 30 but class_text.npy has 32"),
    "label range": (_label_out_of_range, "normal_labels.npy row 4 is label 9, outside 0..2"),
    "empty class": (_empty_class, "class 'class 2' has no normal images"),
    "duplicate class": (_duplicate_class, "lists class 'cat' twice"),
    "pickled labels": (_pickled_labels, "normal_labels.npy"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_bundle_gives_one_error_line_and_no_version(case, tmp_path):
    world = synthetic_world(classes=3, entries=120, per_class=10, tests=1)
    folder = bundle_from(world, tmp_path / "bundle")
    mutate, message = CASES[case]
    mutate(folder)
    data = tmp_path / "data"
    result = run_cli("index", "build", "--name", "bad", "--from-embeddings", folder, data_dir=data)
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert message in lines[-1]
    assert not any("Traceback" in line for line in lines)
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}", migrate=True) as store:
        assert store.list_versions() == []


def test_bad_image_folders(tmp_path):
    data = tmp_path / "data"
    empty_root = tmp_path / "nothing"
    empty_root.mkdir()
    result = run_cli("index", "build", "--name", "x", "--from-images", empty_root, data_dir=data)
    assert result.code == 2 and "has no class sub-folders" in result.stderr

    write_shape_folders(tmp_path / "imgs", ["circle", "square"], 2)
    (tmp_path / "imgs" / "empty").mkdir()
    result = run_cli(
        "index", "build", "--name", "x", "--from-images", tmp_path / "imgs", data_dir=data
    )
    assert result.code == 2 and "empty has no images" in result.stderr

    (tmp_path / "imgs" / "empty").rmdir()
    mapping = tmp_path / "map.json"
    mapping.write_text('{"circle": "round", "square": "round"}')
    result = run_cli(
        "index",
        "build",
        "--name",
        "x",
        "--from-images",
        tmp_path / "imgs",
        "--class-map",
        mapping,
        data_dir=data,
    )
    assert result.code == 2 and "both map to class 'round'" in result.stderr


def test_bad_name_and_options(tmp_path):
    world = synthetic_world(classes=2, entries=50, per_class=5, tests=1)
    folder = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    bad_name = run_cli(
        "index", "build", "--name", "../etc", "--from-embeddings", folder, data_dir=data
    )
    assert bad_name.code == 2 and "is not allowed" in bad_name.stderr
    bad_template = run_cli(
        "index",
        "build",
        "--name",
        "ok",
        "--from-embeddings",
        folder,
        "--prompt-template",
        "a {x}",
        data_dir=data,
    )
    assert bad_template.code == 2 and "{label}" in bad_template.stderr
    for lam in ("-0.5", "1e308", "inf", "nan"):
        bad_lambda = run_cli(
            "index", "build", "--name", "ok", "--from-embeddings", folder,
            "--default-lambda", lam, data_dir=data,
        )  # fmt: skip
        assert bad_lambda.code == 2, lam
        assert "--default-lambda must be a finite number between 0 and 1e+06" in bad_lambda.stderr
    assert not (data / "bliss.sqlite3").exists()  # refused before the store is opened


def test_calibration_that_holds_out_nothing_is_refused_before_any_write(tmp_path):
    world = synthetic_world(classes=2, entries=50, per_class=5, tests=1)
    folder = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    for fraction, message in [("0.05", "holds out no image"), ("1.5", "must be in [0, 1)")]:
        result = run_cli(
            "index", "build", "--name", "c", "--from-embeddings", folder,
            "--calibration-fraction", fraction, data_dir=data,
        )  # fmt: skip
        assert result.code == 2 and message in result.stderr, result.stderr
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}", migrate=True) as store:
        assert store.list_versions() == []
