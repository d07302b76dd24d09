"""Where normal images come from: class folders, webdataset tar shards or parquet files.

Each image is an ``ImageItem``: a small picklable description (Ray encoder actors receive
them) that names the image in messages (``key``), says when it changed (``identity()``,
part of the build's fingerprint and of each encoded chunk's record) and reads its bytes
(``read()``). This module scans class folders; ``bliss.indexer.dataset_sources`` scans
webdataset shards and parquet files. Scanning reads only what finds and labels the images;
the image bytes are read by the header check (``bliss.indexer.image_checks``) and again
by the encoder.

Local folders need nothing more. Everything else goes through fsspec (``pip install
'bliss-anomaly[inputs]'``, plus pyarrow for parquet), so ``s3://``, ``gs://``,
``memory://``, ... work wherever that protocol's fsspec backend (s3fs, gcsfs) is installed.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from bliss.dictionaries import read_text_lines
from bliss.errors import InvalidInputError, NotFoundError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
INPUTS_HINT = "pip install 'bliss-anomaly[inputs]'"
# What object stores report as a file's version, most specific first (S3, GCS, local, memory).
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_ROW_GROUP_LOCK = threading.Lock()


class ImageItem(Protocol):
    """One normal image, wherever it is stored."""

    @property
    def key(self) -> str:
        """What names it in messages: a path, a URL, ``shard.tar#member``, ``f.parquet#row=12``."""
        ...

    def identity(self) -> str:
        """The key plus what changes when the image does (size, mtime or etag)."""
        ...

    def read(self) -> bytes:
        """The encoded image file (OSError when it cannot be read)."""
        ...


@dataclass(frozen=True)
class ImageClass:
    name: str
    files: tuple[ImageItem, ...]
    skipped: int = 0  # bad images the header check dropped (--skip-bad-images)


@dataclass(frozen=True)
class LocalImage:
    path: Path

    @property
    def key(self) -> str:
        return str(self.path)

    def identity(self) -> str:
        stat = self.path.stat()
        # The format build fingerprints used before image items, so those builds still match.
        return f"{self.path}\0{stat.st_size}\0{stat.st_mtime_ns}"

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class UrlImage:
    url: str
    size: int | None = None  # from the listing; None: asked for by identity()
    version: str = ""

    @property
    def key(self) -> str:
        return self.url

    def identity(self) -> str:
        size, version = self.size, self.version
        if size is None:
            fs, path = filesystem(self.url)
            info = fs.info(path)
            size, version = info.get("size"), _version(info)
        return f"{self.url}\0{size}\0{version}"

    def read(self) -> bytes:
        fs, path = filesystem(self.url)
        return fs.cat_file(path)


@dataclass(frozen=True)
class TarMember:
    """A member of an uncompressed tar shard, read as one byte range of the shard."""

    shard: str
    member: str
    offset: int
    size: int
    shard_version: str  # the shard's size and etag or mtime when it was scanned

    @property
    def key(self) -> str:
        return f"{self.shard}#{self.member}"

    def identity(self) -> str:
        return f"{self.key}\0{self.offset}\0{self.size}\0{self.shard_version}"

    def read(self) -> bytes:
        fs, path = filesystem(self.shard)
        data = fs.cat_file(path, start=self.offset, end=self.offset + self.size)
        if len(data) != self.size:
            raise OSError(f"got {len(data)} of {self.size} bytes: the shard changed since the scan")
        return data


@dataclass(frozen=True)
class ParquetCell:
    """One row of a parquet image column: bytes, or a struct with ``bytes`` and ``path``."""

    file: str
    row: int
    row_group: int
    row_in_group: int
    column: str
    file_version: str

    @property
    def key(self) -> str:
        return f"{self.file}#row={self.row}"

    def identity(self) -> str:
        return f"{self.key}\0{self.column}\0{self.file_version}"

    def read(self) -> bytes:
        # One reader at a time: threads reading neighbouring rows would otherwise all miss
        # the cache at a row group's start and each read the whole group.
        with _ROW_GROUP_LOCK:
            cells = _row_group_cells(self.file, self.file_version, self.row_group, self.column)
        value = cells[self.row_in_group]
        if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is None and value.get("path"):
                return file_item(value["path"], parent_url(self.file)).read()
            value = value.get("bytes")
        if not value:
            raise OSError(f"column {self.column!r} holds no image bytes in this row")
        return value


def scan_image_folder(root: str | Path, class_map: Path | None = None) -> list[ImageClass]:
    """One class per sub-folder of a local folder or fsspec URL, by folder name."""
    if isinstance(root, str) and _URL.match(root):
        return _scan_url_folder(root, class_map)
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled: list[tuple[str, ImageItem]] = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidInputError(f"class folder {folder} has no images ({image_suffixes()})")
        labelled.extend((folder.name, LocalImage(path)) for path in files)
    return classes_by_label(labelled, class_map, "folder", f"{root} has no class sub-folders")


def _scan_url_folder(root: str, class_map: Path | None) -> list[ImageClass]:
    fs, path = filesystem(root)
    with reading(root, "image folder"):
        entries = fs.ls(path, detail=True)
        folders = sorted(
            entry["name"]
            for entry in entries
            if entry["type"] == "directory" and not _basename(entry["name"]).startswith(".")
        )
        labelled: list[tuple[str, ImageItem]] = []
        for folder in folders:
            found = fs.find(folder, detail=True)
            files = sorted(name for name in found if Path(name).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                url = fs.unstrip_protocol(folder)
                raise InvalidInputError(f"class folder {url} has no images ({image_suffixes()})")
            labelled.extend(
                (
                    _basename(folder),
                    UrlImage(fs.unstrip_protocol(name), found[name]["size"], _version(found[name])),
                )
                for name in files
            )
    return classes_by_label(labelled, class_map, "folder", f"{root} has no class sub-folders")


def expand_pattern(pattern: str) -> list[str]:
    """Brace ranges and lists (``{00000..00099}``, ``{a,b}``) as webdataset has them, then globs."""
    urls: list[str] = []
    for candidate in _expand_braces(pattern):
        if any(c in candidate for c in "*?["):
            fs, path = filesystem(candidate)
            urls.extend(_url(fs, found) for found in sorted(fs.glob(path)))
        else:
            urls.append(candidate)
    if not urls:
        raise NotFoundError(f"no file matches {pattern}")
    return urls


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        # Zero-padded bounds pad every number to their width, as braceexpand does.
        width = max(len(first), len(last)) if first[0] == "0" or last[0] == "0" else 0
        step = 1 if int(last) >= int(first) else -1
        options = [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise InvalidInputError(
            f"{pattern}: {{{body}}} is neither a range {{A..B}} nor a list {{a,b}}"
        )
    tails = _expand_braces(pattern[match.end() :])
    return [pattern[: match.start()] + option + tail for option in options for tail in tails]


@functools.lru_cache(maxsize=2)
def _row_group_cells(file: str, version: str, row_group: int, column: str) -> list[Any]:
    """One row group's image cells; items are read in order, so this is read once per group.

    ``version`` is part of the cache key so that a rewritten file is read again.
    """
    pq = require("pyarrow.parquet", "pyarrow")
    fs, path = filesystem(file)
    with fs.open(path, "rb") as raw:
        return pq.ParquetFile(raw).read_row_group(row_group, columns=[column]).column(0).to_pylist()


def file_item(location: str, base: str) -> ImageItem:
    """A path or URL from a parquet cell; relative paths are relative to the parquet file."""
    if _URL.match(location):
        return UrlImage(location)
    if _URL.match(base) and not location.startswith("/"):
        return UrlImage(f"{base}/{location}")
    return LocalImage(Path(base, location))


def classes_by_label(
    labelled: Iterable[tuple[str, ImageItem]], class_map: Path | None, what: str, empty: str
) -> list[ImageClass]:
    """One class per raw label (sorted by label), named through ``class_map``."""
    groups: dict[str, list[ImageItem]] = {}
    for label, item in labelled:
        groups.setdefault(label, []).append(item)
    if not groups:
        raise InvalidInputError(empty)
    labels = sorted(groups)
    names = _class_names(labels, class_map, what)
    return [ImageClass(names[label], tuple(groups[label])) for label in labels]


def _class_names(labels: list[str], class_map: Path | None, what: str) -> dict[str, str]:
    names = {label: label for label in labels}
    if class_map is not None:
        mapping = _read_class_map(class_map)
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise InvalidInputError(
                f"{class_map} maps {what} {unknown[0]!r}, which no input image has"
            )
        names.update(mapping)
    seen: dict[str, str] = {}
    for label, name in names.items():
        if name in seen:
            raise InvalidInputError(
                f"{what}s {seen[name]!r} and {label!r} both map to class {name!r}"
            )
        seen[name] = label
    return names


def _read_class_map(path: Path) -> dict[str, str]:
    """A JSON object {folder or label: class}, or lines 'folder<TAB>class'."""
    if not path.is_file():
        raise NotFoundError(f"class map {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"class map {path} is not UTF-8 text (byte {error.start + 1}: {error.reason}): "
                "convert it, e.g. with `iconv -f latin1 -t utf-8`"
            ) from None
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise InvalidInputError(
                f"{path} must be a JSON object mapping folder names or labels to class names"
            )
        unnamed = [key for key, value in mapping.items() if not value.strip()]
        if unnamed:
            raise InvalidInputError(
                f"{path} maps {unnamed[0]!r} to an empty class name: give every class a name"
            )
        return {str(k): v.strip() for k, v in mapping.items()}
    with open(path, "rb") as stream:  # lines, encoding and characters as dictionary files
        lines = list(read_text_lines(stream, f"class map {path}"))
    mapping = {}
    for number, line in lines:
        if not line.strip():
            continue
        folder, separator, label = line.partition("\t")
        if not separator or not label.strip():
            raise InvalidInputError(f"{path} line {number}: expected 'folder<TAB>label'")
        mapping[folder.strip()] = label.strip()
    return mapping


def require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidInputError(
            f"webdataset shards, parquet files and URLs need {package}: {INPUTS_HINT}"
        ) from None


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for a URL or local path, and the path within it."""
    core = require("fsspec.core", "fsspec")
    try:
        return core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # e.g. s3:// without s3fs installed
        raise InvalidInputError(f"cannot read {url}: {error}") from None


@contextmanager
def reading(url: str, what: str) -> Iterator[None]:
    """Storage errors while scanning as one line naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise NotFoundError(f"{what} {url} does not exist") from None
    except OSError as error:
        raise InvalidInputError(f"cannot read {what} {url}: {error}") from None


def _url(fs: Any, path: str) -> str:
    """The URL of a path fsspec returned; local paths stay plain paths."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return path if "file" in protocols else fs.unstrip_protocol(path)


def _version(info: dict[str, Any]) -> str:
    return next((str(info[f]) for f in _VERSION_FIELDS if info.get(f) is not None), "")


def file_version(info: dict[str, Any]) -> str:
    return f"{info.get('size')}:{_version(info)}"


def parent_url(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def image_suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))
