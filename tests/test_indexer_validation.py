"""The indexer checks everything before heavy work: one line per problem, nothing left behind.

Each bad input or option gives exit code 2 and one ``error:`` line naming the file and
the line or row (or the option); no version, no workspace and no index file remains.
A full disk mid-build is one line too, and the build then resumes.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bliss.dictionaries import text_file_dictionary
from bliss.errors import InvalidInputError
from bliss.indexer import workspace as workspace_module
from bliss.store import Store
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import CliResult, run_cli
from tests.synthetic_embeddings import synthetic_world
from tests.test_indexer_embeddings import bundle_from

ENTRIES = 120


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=3, entries=ENTRIES, per_class=10, tests=1)


def build(folder: Path, data: Path, *extra: str) -> CliResult:
    return run_cli(
        "index", "build", "--name", "v", "--from-embeddings", folder, *extra, data_dir=data
    )


def assert_refused_leaving_nothing(result: CliResult, message: str, data: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.code == 2, result.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], lines
    assert message in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    store_file = data / "bliss.sqlite3"
    if store_file.exists():
        with Store.open(f"sqlite:///{store_file}", migrate=True) as store:
            assert store.list_versions() == []
    for leftover in ("builds", "indexes", ".trash"):
        assert not (data / leftover).exists() or not any((data / leftover).iterdir()), leftover


def write_lines(path: Path, lines: list[str], *, ending: str = "\n", bom: bool = False) -> None:
    body = ending.join(lines) + ending
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))


def _entries(line: int, text: str):
    def mutate(folder: Path) -> None:
        lines = [f"entry {i}" for i in range(ENTRIES)]
        lines[line - 1] = text
        write_lines(folder / "dictionary.txt", lines)

    return mutate


def _class_line(line: int, text: str):
    def mutate(folder: Path) -> None:
        names = ["class 0", "class 1", "class 2"]
        names[line - 1] = text
        write_lines(folder / "classes.txt", names)

    return mutate


def _npy(name: str, content):
    def mutate(folder: Path) -> None:
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        elif callable(content):
            content(folder / name)
        else:
            np.save(folder / name, content, allow_pickle=True)

    return mutate


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _nan_label_embedding(path: Path) -> None:
    labels = np.load(path)
    labels[1, 0] = np.inf
    np.save(path, labels)


BUNDLE_CASES = {
    "NUL": (_entries(5, "a\x00b"), "dictionary.txt line 5 contains a NUL character at column 2"),
    "bell": (
        _entries(6, "ding\x07"),
        "dictionary.txt line 6 contains the control character U+0007",
    ),
    "BOM inside": (_entries(7, "\ufeffx"), "line 7 contains a byte-order mark (U+FEFF)"),
    "LINE SEPARATOR": (_entries(8, "a\u2028b"), "line 8 contains U+2028 LINE SEPARATOR"),
    "PARAGRAPH SEPARATOR": (_entries(9, "a\u2029b"), "line 9 contains U+2029 PARAGRAPH"),
    "NEXT LINE": (_entries(10, "a\x85b"), "line 10 contains U+0085 NEXT LINE"),
    "lone CR": (_entries(11, "a\rb"), "line 11 contains a carriage return that does not end"),
    "form feed": (_entries(12, "a\x0cb"), "line 12 contains a form feed"),
    "empty line": (_entries(13, ""), "dictionary.txt line 13 is empty"),
    "blank line": (_entries(14, " \t "), "dictionary.txt line 14 is empty (or only spaces)"),
    "not UTF-8": (
        _npy("dictionary.txt", b"entry 0\ncaf\xe9\n"),
        "dictionary.txt is not UTF-8 text (line 2, byte 4",
    ),
    "class control": (_class_line(2, "dog\x1b"), "classes.txt line 2 contains the control"),
    "class empty": (_class_line(3, "  "), "classes.txt line 3 is empty"),
    "empty npy": (_npy("normal.npy", b""), "normal.npy is empty (0 bytes)"),
    "not npy": (_npy("class_text.npy", b"just text"), "class_text.npy is not a .npy file"),
    "truncated npy": (_npy("dictionary.npy", _truncate), "dictionary.npy is not a usable"),
    "object npy": (
        _npy("normal_labels.npy", np.array([None] * 30, dtype=object)),
        "normal_labels.npy is not a usable numeric .npy array: it holds Python objects",
    ),
    "int embeddings": (
        _npy("class_text.npy", np.ones((3, 32), dtype=np.int32)),
        "class_text.npy has dtype int32, expected float32",
    ),
    "complex embeddings": (
        _npy("normal.npy", np.ones((30, 32), dtype=np.complex64)),
        "normal.npy has dtype complex64",
    ),
    "3-D": (
        _npy("normal.npy", np.ones((30, 32, 1), np.float32)),
        "normal.npy has shape (30, 32, 1)",
    ),
    "no rows": (_npy("normal.npy", np.ones((0, 32), np.float32)), "normal.npy has shape (0, 32)"),
    "float labels": (
        _npy("normal_labels.npy", np.zeros(30, np.float32)),
        "normal_labels.npy has dtype float32, expected integers",
    ),
    "inf label embedding": (
        _npy("class_text.npy", _nan_label_embedding),
        "class_text.npy row 1 contains NaN, inf or only zeros",
    ),
}


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_bad_bundle_files_are_one_line_naming_file_and_line(case, world, tmp_path):
    folder = bundle_from(world, tmp_path / "bundle")
    mutate, message = BUNDLE_CASES[case]
    mutate(folder)
    data = tmp_path / "data"
    assert_refused_leaving_nothing(build(folder, data), message, data)


def test_line_endings_and_a_leading_bom_count_like_the_npy_rows(world, tmp_path):
    """CRLF lines and a BOM at the start are one entry per line, as a numpy writer counts."""
    folder = bundle_from(world, tmp_path / "bundle")
    write_lines(
        folder / "dictionary.txt", [f"entry {i}" for i in range(ENTRIES)], ending="\r\n", bom=True
    )
    write_lines(folder / "classes.txt", ["class 0", "class 1", "class 2"], bom=True)
    data = tmp_path / "data"
    result = build(folder, data)
    assert result.code == 0, result.stderr
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        version = store.get_version("v", 1)
        assert store.entry_texts(version.id, [0, ENTRIES - 1]) == [
            "entry 0",
            f"entry {ENTRIES - 1}",
        ]
        assert [c.name for c in store.load_classes(version.id)] == ["class 0", "class 1", "class 2"]


OPTION_CASES = {
    "nprobe": (("--index-kind", "ivf", "--nprobe", "0"), "--nprobe must be at least 1, got 0"),
    "nlist zero": (("--index-kind", "ivf", "--nlist", "0"), "--nlist must be at least 1, got 0"),
    "nlist too large": (
        ("--index-kind", "ivf", "--nlist", "500"),
        f"--nlist 500 is larger than the dictionary ({ENTRIES} entries)",
    ),
    "hnsw-m": (("--index-kind", "hnsw", "--hnsw-m", "1"), "--hnsw-m must be at least 2, got 1"),
    "ef-search": (("--ef-search", "0"), "--ef-search must be at least 1, got 0"),
    "pq-m zero": (("--pq-m", "0"), "--pq-m must be at least 1, got 0"),
    "pq-m divides": (
        ("--index-kind", "ivfpq", "--pq-m", "5"),
        "--pq-m 5 does not divide the embedding dimension 32: use one of 1, 2, 4, 8, 16, 32",
    ),
    "pq training": (("--index-kind", "ivfpq"), "needs at least 256 dictionary entries"),
    "batch-size": (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    "chunk-size": (("--chunk-size", "0"), "--chunk-size must be at least 1, got 0"),
    "recall zero": (("--target-recall", "0"), "--target-recall must be in (0, 1]"),
    "recall above one": (("--target-recall", "1.5"), "--target-recall must be in (0, 1]"),
    "recall nan": (("--target-recall", "nan"), "--target-recall must be in (0, 1]"),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_bad_numeric_options_are_one_line(case, world, tmp_path):
    folder = bundle_from(world, tmp_path / "bundle")
    extra, message = OPTION_CASES[case]
    data = tmp_path / "data"
    assert_refused_leaving_nothing(build(folder, data, *extra), message, data)


def test_the_name_limit_is_said(world, tmp_path):
    folder = bundle_from(world, tmp_path / "bundle")
    data = tmp_path / "data"
    result = run_cli(
        "index", "build", "--name", "n" * 101, "--from-embeddings", folder, data_dir=data
    )
    assert_refused_leaving_nothing(result, "is 101 characters long: the limit is 100", data)
    result = run_cli(
        "index", "build", "--name", "n" * 100, "--from-embeddings", folder, data_dir=data
    )
    assert result.code == 0, result.stderr


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shape_folders(root / "normal", ["circle", "square"], 2)
    return root / "normal"


def image_build(shapes: Path, data: Path, *extra: str) -> CliResult:
    return run_cli(
        "index", "build", "--name", "img", "--from-images", shapes,
        "--model", "bliss-tiny-random-TEST-ONLY", *extra, data_dir=data,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"cat\ndog\x00\n", "line 2 contains a NUL character"),
        ("cat\nd\u2028og\n".encode(), "line 2 contains U+2028 LINE SEPARATOR"),
        (b"cat\n\xff\xfedog\n", "is not UTF-8 text (line 2, byte 1"),
        ("cat\n\ufeffdog\n".encode(), "line 2 contains a byte-order mark"),
    ],
)
def test_a_bad_file_dictionary_stops_an_image_build_first(content, message, shapes, tmp_path):
    words = tmp_path / "words.txt"
    words.write_bytes(content)
    data = tmp_path / "data"
    result = image_build(shapes, data, "--dictionary", f"file:{words}")
    assert_refused_leaving_nothing(result, f"dictionary file {words} {message}", data)


def test_file_dictionaries_count_lines_as_bundles_do(tmp_path):
    words = tmp_path / "words.txt"
    words.write_bytes(b"\xef\xbb\xbfcat\r\ndog\n\n  bird  \nfish")
    assert list(text_file_dictionary(words).entries()) == ["cat", "dog", "bird", "fish"]
    words.write_bytes(b"cat\x0bdog\n")
    with pytest.raises(
        InvalidInputError,
        match=r"line 1 contains a vertical tab \(a line break to some tools\) at column 4",
    ):
        text_file_dictionary(words)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("map.json", '{"circle": "round", "square": " "}', "maps 'square' to an empty class name"),
        ("map.json", '{"circle": "r\xe9"}'.encode("latin-1"), "is not UTF-8 text (byte 14"),
        ("map.tsv", "circle\tround\nsquare\t\n", "line 2: expected 'folder<TAB>label'"),
        ("map.tsv", "circle\tro\u2028und\n", "line 1 contains U+2028 LINE SEPARATOR"),
        ("map.tsv", b"circle\tr\xe9\n", "is not UTF-8 text (line 1, byte 9"),
    ],
)
def test_bad_class_maps_are_one_line(name, content, message, shapes, tmp_path):
    mapping = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    mapping.write_bytes(content)
    data = tmp_path / "data"
    result = image_build(shapes, data, "--class-map", mapping)
    assert_refused_leaving_nothing(result, message, data)


class _Full:
    """np.savez that fills the disk at its ``at``-th call, as a write() would fail."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.real = np.savez

    def __call__(self, file, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise OSError(errno.ENOSPC, "No space left on device", getattr(file, "name", None))
        return self.real(file, *args, **kwargs)


def _result(data: Path) -> dict:
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        (version,) = store.list_versions("v")
        classes = store.load_classes(version.id)
        mean, std = store.all_entry_statistics(version.id, len(classes), version.dictionary_size)
        return {
            "state": version.state.value,
            "faiss": version.faiss_checksum,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "classes": [(c.name, c.sample_count, c.label_mean) for c in classes],
        }


def test_a_full_disk_is_one_line_and_the_build_resumes(world, tmp_path, monkeypatch, caplog):
    folder = bundle_from(world, tmp_path / "bundle")
    clean = tmp_path / "clean"
    assert build(folder, clean).code == 0

    data = tmp_path / "data"
    full = _Full(at=2)  # the second class's statistics
    monkeypatch.setattr(workspace_module.np, "savez", full)
    result = build(folder, data)
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and full.calls == 2
    assert lines[-1].startswith("error: no space left on the device while writing ")
    assert "run the same command again: the build resumes where it stopped" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not list((data / "builds").rglob("*.tmp-*"))  # no half-written file
    monkeypatch.undo()

    with caplog.at_level(logging.INFO):
        resumed = build(folder, data)
    assert resumed.code == 0, resumed.stderr
    assert "resuming the build of v@1" in caplog.text
    assert _result(data) == _result(clean)
    assert (
        json.loads(run_cli("index", "list", "--json", data_dir=data).stdout)[0]["state"] == "ready"
    )
