"""Image inputs at scale: webdataset shards, parquet files, fsspec URLs, and the header check."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bliss.dictionaries import resolve_dictionary
from bliss.encoders import TINY_TEST_MODEL, open_rgb
from bliss.errors import InvalidInputError, NotFoundError
from bliss.indexer import dataset_sources
from bliss.indexer.dataset_sources import scan_parquet, scan_webdataset
from bliss.indexer.image_checks import check_images, image_problem
from bliss.indexer.image_sources import (
    ImageClass,
    LocalImage,
    TarMember,
    UrlImage,
    expand_pattern,
    scan_image_folder,
)
from bliss.store import Store
from bliss.synthetic_images import draw_shape, write_shape_folders
from tests.cli_runner import run_cli

SHAPES = ["circle", "square", "triangle"]
PER_CLASS = 4
WORDS = "cat\ndog\ncircle\nbox\nstar\n"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("shapes")
    return root / "folder", write_shape_folders(root / "folder", SHAPES, PER_CLASS, seed=3)


def write_shards(folder: Path, paths: dict[str, list[Path]], label: str = "cls") -> list[Path]:
    """Two shards of samples 'part/<stem>.png' plus a '.cls' or '.json' label member."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [(name, path) for name, files in paths.items() for path in files]
    shards = [folder / f"{n:05d}.tar" for n in range(2)]
    half = len(samples) // 2
    for shard, part in zip(shards, (samples[:half], samples[half:]), strict=True):
        with tarfile.open(shard, "w") as tar:
            for name, path in part:
                tar.add(path, arcname=f"part/{path.stem}.png")
                if label == "cls":
                    add_member(tar, f"part/{path.stem}.cls", name.encode())
                elif label == "json":
                    add_member(tar, f"part/{path.stem}.json", json.dumps({"kind": name}).encode())
    return shards


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def class_summary(classes: list[ImageClass]) -> list[tuple[str, int]]:
    return [(image_class.name, len(image_class.files)) for image_class in classes]


# ---------------------------------------------------------------- sources


def test_brace_patterns_expand_like_webdataset(tmp_path):
    assert expand_pattern("s/{0008..0010}.tar") == ["s/0008.tar", "s/0009.tar", "s/0010.tar"]
    assert expand_pattern("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    with pytest.raises(InvalidInputError, match="neither a range"):
        expand_pattern("s/{x}.tar")
    pytest.importorskip("fsspec")
    (tmp_path / "b.tar").touch()
    (tmp_path / "a.tar").touch()
    assert expand_pattern(f"{tmp_path}/*.tar") == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    with pytest.raises(NotFoundError, match="no file matches"):
        expand_pattern(f"{tmp_path}/*.parquet")


@pytest.mark.parametrize("label", ["cls", "json", "key"])
def test_webdataset_samples_and_labels(shapes, tmp_path, label):
    pytest.importorskip("fsspec")
    folder, paths = shapes
    write_shards(tmp_path, paths, label)
    class_from = {"cls": "cls", "json": "json:kind", "key": r"key:/([a-z]+)_\d+$"}[label]
    classes = scan_webdataset(f"{tmp_path}/{{00000..00001}}.tar", class_from)
    assert class_summary(classes) == class_summary(scan_image_folder(folder))
    item = classes[0].files[0]
    assert isinstance(item, TarMember)
    assert item.key == f"{tmp_path}/00000.tar#part/circle_000.png"
    assert item.read() == paths["circle"][0].read_bytes()
    assert item.identity() != classes[0].files[1].identity()
    assert pickle.loads(pickle.dumps(item)) == item  # Ray actors receive items


def test_class_map_renames_webdataset_labels(shapes, tmp_path):
    pytest.importorskip("fsspec")
    write_shards(tmp_path, shapes[1])
    mapping = tmp_path / "map.json"
    mapping.write_text('{"circle": "round", "triangle": "pointy"}')
    classes = scan_webdataset(f"{tmp_path}/*.tar", class_map=mapping)
    assert class_summary(classes) == [("round", 4), ("square", 4), ("pointy", 4)]
    mapping.write_text('{"hexagon": "six"}')
    with pytest.raises(InvalidInputError, match="maps label 'hexagon', which no input image has"):
        scan_webdataset(f"{tmp_path}/*.tar", class_map=mapping)


def test_webdataset_refusals(shapes, tmp_path):
    pytest.importorskip("fsspec")
    _, paths = shapes
    write_shards(tmp_path, paths, label="none")
    with pytest.raises(InvalidInputError, match=r"00000.tar#part/circle_000 has no label"):
        scan_webdataset(f"{tmp_path}/00000.tar")
    with pytest.raises(InvalidInputError, match="exactly one group"):
        scan_webdataset(f"{tmp_path}/00000.tar", "key:[a-z]+")
    with tarfile.open(tmp_path / "zipped.tar", "w:gz") as tar:
        tar.add(paths["circle"][0], arcname="a.png")
    with pytest.raises(InvalidInputError, match="not an uncompressed tar"):
        scan_webdataset(f"{tmp_path}/zipped.tar", "key:(a)")
    with pytest.raises(NotFoundError, match="does not exist"):
        scan_webdataset(f"{tmp_path}/missing.tar")


def test_parquet_bytes_structs_and_paths(shapes, tmp_path, monkeypatch, caplog):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder, paths = shapes
    samples = [(name, path) for name, files in paths.items() for path in files]
    labels = [name for name, _ in samples]
    images = [path.read_bytes() for _, path in samples]
    # Three row groups per file, so items read from several groups of one file.
    pq.write_table(
        pa.table({"image": pa.array(images, pa.binary()), "label": labels}),
        tmp_path / "bytes.parquet",
        row_group_size=5,
    )
    monkeypatch.setattr(dataset_sources, "LARGE_ROW_GROUP_BYTES", 1000)
    classes = scan_parquet(f"{tmp_path}/bytes.parquet")
    assert class_summary(classes) == class_summary(scan_image_folder(folder))
    assert "bytes.parquet: a row group holds" in caplog.text
    assert classes[2].files[-1].key == f"{tmp_path}/bytes.parquet#row=11"
    assert [item.read() for item in classes[1].files] == images[4:8]

    # As Hugging Face datasets writes it: {bytes, path} structs, labels as ClassLabel indices.
    structs = [
        {"bytes": data, "path": path.name} for data, (_, path) in zip(images, samples, strict=True)
    ]
    features = {"label": {"names": SHAPES, "_type": "ClassLabel"}, "img": {"_type": "Image"}}
    table = pa.table({"img": structs, "label": [SHAPES.index(name) for name in labels]})
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=4)
    classes = scan_parquet(f"{tmp_path}/hf.parquet", image_column="img")
    assert class_summary(classes) == class_summary(scan_image_folder(folder))
    assert classes[0].files[3].read() == images[3]

    relative = [str(path.relative_to(folder)) for _, path in samples]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"file": relative, "label": labels}), tmp_path / "data/p.parquet")
    (tmp_path / "data").rename(folder.parent / "listing")
    classes = scan_parquet(f"{folder.parent}/listing/*.parquet", image_column="file")
    assert isinstance(classes[0].files[0], LocalImage)
    # Relative paths are relative to the parquet file.
    with pytest.raises(FileNotFoundError):
        classes[0].files[0].read()
    with pytest.raises(InvalidInputError, match=r"has no column 'image'.*--image-column"):
        scan_parquet(f"{folder.parent}/listing/p.parquet")


def test_memory_filesystem_folder_and_dictionary(shapes):
    fsspec = pytest.importorskip("fsspec")
    folder, paths = shapes
    memory = fsspec.filesystem("memory")
    for name, files in paths.items():
        for path in files:
            memory.pipe(f"/imgs/{name}/{path.name}", path.read_bytes())
    memory.pipe("/imgs/circle/notes.txt", b"not an image")
    memory.pipe("/words.txt", WORDS.encode())
    try:
        classes = scan_image_folder("memory://imgs")
        assert class_summary(classes) == class_summary(scan_image_folder(folder))
        item = classes[1].files[0]
        assert isinstance(item, UrlImage) and item.key == "memory:///imgs/square/square_000.png"
        assert item.read() == paths["square"][0].read_bytes()
        dictionary = resolve_dictionary("file:memory://words.txt")
        assert list(dictionary.entries()) == WORDS.split()
        assert dictionary.source == "file:memory://words.txt"
        with pytest.raises(NotFoundError, match=r"memory://nothing\.txt"):
            resolve_dictionary("file:memory://nothing.txt")
    finally:
        memory.rm("/imgs", recursive=True)
        memory.rm("/words.txt")


def test_missing_extra_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "fsspec", None)
    monkeypatch.setitem(__import__("sys").modules, "fsspec.core", None)
    with pytest.raises(InvalidInputError, match=r"pip install 'bliss-anomaly\[inputs\]'"):
        scan_webdataset("shards/*.tar")
    with pytest.raises(InvalidInputError, match=r"pip install 'bliss-anomaly\[inputs\]'"):
        resolve_dictionary("file:s3://bucket/words.txt")


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    wide.save(tmp_path / "rotated.png", exif=exif.tobytes())
    upright = open_rgb(LocalImage(tmp_path / "rotated.png"))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5)) == (255, 0, 0)  # the left (red) half is now on top
    assert open_rgb(tmp_path / "rotated.png").size == (20, 40)
    with pytest.raises(InvalidInputError, match=r"cannot open image .*missing.png: "):
        open_rgb(LocalImage(tmp_path / "missing.png"))


# ---------------------------------------------------------------- header check


def test_header_check_finds_corrupt_truncated_and_oversized_images(tmp_path):
    rng = np.random.default_rng(0)
    jpeg, png = io.BytesIO(), io.BytesIO()
    draw_shape("circle", rng).save(jpeg, "JPEG")
    draw_shape("circle", rng).save(png, "PNG")
    assert image_problem(jpeg.getvalue(), 10_000) is None
    assert image_problem(png.getvalue(), 10_000) is None
    assert "not an image in a format PIL reads" in image_problem(b"not an image", 10_000)
    assert "truncated" in image_problem(jpeg.getvalue()[:-200], 10_000)
    assert "cannot be decoded" in image_problem(png.getvalue()[:-100], 10_000)
    assert "64x64 is 4,096 pixels, over the budget of 4,000" in image_problem(png.getvalue(), 4000)

    paths = write_shape_folders(tmp_path / "imgs", SHAPES, PER_CLASS)
    paths["square"][1].write_bytes(b"garbage")
    paths["triangle"][0].write_bytes(jpeg.getvalue()[:-200])
    classes = scan_image_folder(tmp_path / "imgs")
    with pytest.raises(InvalidInputError) as refused:
        check_images(classes)
    message = str(refused.value)
    assert message.startswith("2 of 12 normal images cannot be used (")
    assert "square_001.png: not an image" in message and "--skip-bad-images" in message
    assert "\n" not in message

    kept = check_images(classes, skip_bad=True)
    assert class_summary(kept) == [("circle", 4), ("square", 3), ("triangle", 3)]
    assert [image_class.skipped for image_class in kept] == [0, 1, 1]
    assert paths["square"][1] not in [item.path for item in kept[1].files]

    with pytest.raises(InvalidInputError, match="over the budget"):
        check_images(classes[:1], max_pixels=1000)
    with pytest.raises(InvalidInputError, match="'circle' has no usable image: all 4 are bad"):
        check_images(classes[:1], max_pixels=1000, skip_bad=True)
    with pytest.raises(InvalidInputError, match="must be between 1 and"):
        check_images(classes, max_pixels=0)


# ---------------------------------------------------------------- end to end


def build(data: Path, name: str, *source: str | Path) -> tuple[int, str, str]:
    result = run_cli(
        "index", "build", "--name", name, *source, "--model", TINY_TEST_MODEL,
        "--default-k", "3", "--chunk-size", "5",
        data_dir=data, store_url=f"sqlite:///{data / 'store.sqlite3'}",
    )  # fmt: skip
    return result.code, result.stdout, result.stderr


def statistics(data: Path, name: str) -> tuple[list, np.ndarray, np.ndarray]:
    with Store.open(f"sqlite:///{data / 'store.sqlite3'}") as store:
        version = store.get_version(name, 1)
        classes = store.load_classes(version.id)
        mean, std = store.all_entry_statistics(version.id, len(classes), version.dictionary_size)
    summary = [
        (c.name, c.sample_count, c.label_mean, c.label_std, c.moment_mean.round(6).tolist())
        for c in classes
    ]
    return summary, mean, std


def test_webdataset_parquet_and_folder_builds_agree(shapes, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    fsspec = pytest.importorskip("fsspec")
    folder, paths = shapes
    words = tmp_path / "words.txt"
    words.write_text(WORDS)
    write_shards(tmp_path / "shards", paths)
    samples = [(name, path) for name, files in paths.items() for path in files]
    table = pa.table(
        {"image": [p.read_bytes() for _, p in samples], "label": [n for n, _ in samples]}
    )
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=5)
    fsspec.filesystem("memory").pipe("/build-words.txt", WORDS.encode())
    data = tmp_path / "data"

    dictionary = ("--dictionary", f"file:{words}")
    code, _, stderr = build(data, "folder", "--from-images", folder, *dictionary)
    assert code == 0, stderr
    shards = f"{tmp_path}/shards/{{00000..00001}}.tar"
    code, _, stderr = build(data, "wds", "--from-webdataset", shards, *dictionary)
    assert code == 0, stderr
    parquet = ("--from-parquet", f"{tmp_path}/*.parquet")
    code, _, stderr = build(data, "pq", *parquet, "--dictionary", "file:memory://build-words.txt")
    assert code == 0, stderr

    expected, mean, std = statistics(data, "folder")
    assert [row[:2] for row in expected] == [(name, PER_CLASS) for name in SHAPES]
    for name in ("wds", "pq"):
        summary, other_mean, other_std = statistics(data, name)
        assert summary == expected
        np.testing.assert_allclose(other_mean, mean, atol=1e-6)
        np.testing.assert_allclose(other_std, std, atol=1e-6)

    again = build(data, "wds", "--from-webdataset", shards, *dictionary)
    assert again[0] == 0 and again[1].startswith("unchanged wds@1")
    wrong = build(data, "x", "--from-webdataset", shards, "--image-column", "img")
    assert wrong[0] == 2 and "--image-column applies to --from-parquet only" in wrong[2]


def test_bad_images_stop_the_build_or_are_skipped(tmp_path, caplog):
    paths = write_shape_folders(tmp_path / "imgs", SHAPES, 3)
    paths["circle"][2].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "words.txt").write_text(WORDS)
    source = ("--from-images", tmp_path / "imgs", "--dictionary", f"file:{tmp_path / 'words.txt'}")
    data = tmp_path / "data"
    code, stdout, stderr = build(data, "bad", *source)
    lines = stderr.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: 1 of 9 normal images cannot be used (")
    assert f"bad image {paths['circle'][2]}: not an image in a format PIL reads" in caplog.text
    assert not (data / "builds").exists()  # stopped before any encoding

    code, stdout, stderr = build(data, "bad", *source, "--skip-bad-images")
    assert code == 0, stderr
    assert "skipped 1 bad normal images (--skip-bad-images)" in stdout
    summary, _, _ = statistics(data, "bad")
    assert [row[:2] for row in summary] == [("circle", 2), ("square", 3), ("triangle", 3)]
