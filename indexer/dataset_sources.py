"""Labelled datasets as large jobs store them: webdataset tar shards and parquet files.

A webdataset sample is the tar members that share a key (``x/0001.jpg``, ``x/0001.cls``,
``x/0001.json``); its class comes from the .cls member, a .json field or the key. A
parquet row holds the image (bytes, a Hugging Face ``{bytes, path}`` struct, or a path or
URL) and the label. Scanning reads tar headers and label members, and parquet label (and
path) columns, never the image bytes.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bliss.errors import InvalidInputError
from bliss.indexer.image_sources import (
    IMAGE_SUFFIXES,
    ImageClass,
    ImageItem,
    ParquetCell,
    TarMember,
    classes_by_label,
    expand_pattern,
    file_item,
    file_version,
    filesystem,
    image_suffixes,
    parent_url,
    reading,
    require,
)

logger = logging.getLogger(__name__)

# Parquet image row groups larger than this get a warning (Hugging Face writes ~100 rows).
LARGE_ROW_GROUP_BYTES = 256 << 20
# webdataset's own split: the key is everything before the first dot of the file name.
_SAMPLE_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def scan_webdataset(
    pattern: str, class_from: str = "cls", class_map: Path | None = None
) -> list[ImageClass]:
    """Samples of webdataset tar shards (``shards/{00000..00099}.tar``), grouped by key.

    ``class_from``: ``cls`` (the sample's .cls member), ``json`` or ``json:FIELD`` (a field
    of its .json member, default ``label``) or ``key:REGEX`` (the one group of REGEX, searched
    in the sample key).
    """
    label_of = _label_reader(class_from)
    labelled: list[tuple[str, ImageItem]] = []
    for shard in expand_pattern(pattern):
        labelled.extend(_shard_samples(shard, label_of))
    return classes_by_label(labelled, class_map, "label", f"no shard of {pattern} holds a sample")


def scan_parquet(
    pattern: str,
    image_column: str = "image",
    label_column: str = "label",
    class_map: Path | None = None,
) -> list[ImageClass]:
    """Rows of parquet files; the image column holds bytes, {bytes, path} structs or paths."""
    labelled: list[tuple[str, ImageItem]] = []
    for file in expand_pattern(pattern):
        labelled.extend(_parquet_rows(file, image_column, label_column))
    return classes_by_label(labelled, class_map, "label", f"no file of {pattern} has a row")


def _shard_samples(shard: str, label_of: _LabelReader) -> Iterator[tuple[str, ImageItem]]:
    fs, path = filesystem(shard)
    with reading(shard, "webdataset shard"):
        version = file_version(fs.info(path))
        with fs.open(path, "rb") as raw, _open_tar(raw, shard) as tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:  # reads the headers only: tarfile seeks past the data
                parts = _SAMPLE_MEMBER.match(member.name) if member.isfile() else None
                if parts:
                    samples.setdefault(parts.group(1), {})[parts.group(2).lower()] = member
            for key, fields in samples.items():
                name = f"{shard}#{key}"
                images = [ext for ext in fields if f".{ext}" in IMAGE_SUFFIXES]
                if len(images) != 1:
                    raise InvalidInputError(
                        f"sample {name} has {len(images)} image members ({', '.join(images)}); "
                        f"each sample needs exactly one ({image_suffixes()})"
                    )
                member = fields[images[0]]
                image = TarMember(shard, member.name, member.offset_data, member.size, version)
                label = label_of(name, key, _member_reader(tar, fields, shard))
                yield label, image


def _open_tar(raw: Any, shard: str) -> tarfile.TarFile:
    try:
        return tarfile.TarFile(fileobj=raw, mode="r")
    except tarfile.ReadError as error:
        raise InvalidInputError(
            f"webdataset shard {shard} is not an uncompressed tar file ({error}): "
            "images are read as byte ranges, so write the shards without compression"
        ) from None


_LabelReader = Callable[[str, str, Callable[[str], str | None]], str]


def _label_reader(spec: str) -> _LabelReader:
    """(sample name, key, text of a member by extension) -> raw label, from --class-from."""
    kind, _, argument = spec.partition(":")
    if kind == "cls" and not argument:
        return lambda name, key, text: _nonempty(text("cls"), name, ".cls member", spec)
    if kind == "json":
        field = argument or "label"
        return lambda name, key, text: _json_label(text("json"), field, name, spec)
    if kind == "key" and argument:
        try:
            regex = re.compile(argument)
        except re.error as error:
            raise InvalidInputError(
                f"--class-from {spec}: not a regular expression: {error}"
            ) from None
        if regex.groups != 1:
            raise InvalidInputError(f"--class-from {spec}: the expression needs exactly one group")

        def from_key(name: str, key: str, text: Callable[[str], str | None]) -> str:
            found = regex.search(key)
            return _nonempty(found and found.group(1), name, f"key match of {argument!r}", spec)

        return from_key
    raise InvalidInputError(
        f"--class-from {spec!r}: use cls, json, json:FIELD or key:REGEX (one group)"
    )


def _json_label(text: str | None, field: str, name: str, spec: str) -> str:
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"sample {name}: the .json member is not JSON: {error}") from None
    label = value.get(field) if isinstance(value, dict) else None
    if isinstance(label, (dict, list)):
        raise InvalidInputError(f"sample {name}: .json field {field!r} is not a string or number")
    return _nonempty(None if label is None else str(label), name, f".json field {field!r}", spec)


def _nonempty(label: str | None, name: str, what: str, spec: str) -> str:
    label = label.strip() if label else ""
    if not label:
        raise InvalidInputError(
            f"sample {name} has no label (--class-from {spec}: no {what}): "
            "choose another --class-from (cls, json:FIELD, key:REGEX)"
        )
    return label


def _member_reader(
    tar: tarfile.TarFile, fields: dict[str, tarfile.TarInfo], shard: str
) -> Callable[[str], str | None]:
    return lambda ext: _member_text(tar, fields, ext, shard)


def _member_text(
    tar: tarfile.TarFile, fields: dict[str, tarfile.TarInfo], ext: str, shard: str
) -> str | None:
    member = fields.get(ext)
    if member is None:
        return None
    file = tar.extractfile(member)
    if file is None:
        return None
    try:
        return file.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{shard}#{member.name} is not UTF-8 text: {error}") from None


def _parquet_rows(
    file: str, image_column: str, label_column: str
) -> Iterator[tuple[str, ImageItem]]:
    pq = require("pyarrow.parquet", "pyarrow")
    fs, path = filesystem(file)
    with reading(file, "parquet file"), fs.open(path, "rb") as raw:
        version = file_version(fs.info(path))
        parquet = pq.ParquetFile(raw)
        schema = parquet.schema_arrow
        for column, option in ((image_column, "--image-column"), (label_column, "--label-column")):
            if column not in schema.names:
                raise InvalidInputError(
                    f"{file} has no column {column!r} (it has {', '.join(schema.names)}): "
                    f"name the column with {option}"
                )
        paths = _image_column_kind(schema.field(image_column).type, file, image_column) == "path"
        if not paths:
            _warn_large_row_groups(parquet.metadata, image_column, file)
        names = _label_names(schema, label_column)
        row = 0
        for group in range(parquet.num_row_groups):
            columns = [label_column, image_column] if paths else [label_column]
            table = parquet.read_row_group(group, columns=columns)
            labels = table.column(label_column).to_pylist()
            images = table.column(image_column).to_pylist() if paths else None
            for index, label in enumerate(labels):
                name = f"{file}#row={row}"
                if label is None or (images is not None and not images[index]):
                    what = label_column if label is None else image_column
                    raise InvalidInputError(f"{name}: column {what!r} is empty")
                if names is not None and isinstance(label, int) and 0 <= label < len(names):
                    label = names[label]
                image = (
                    file_item(images[index], parent_url(file))
                    if images is not None
                    else ParquetCell(file, row, group, index, image_column, version)
                )
                yield str(label), image
                row += 1


def _warn_large_row_groups(metadata: Any, column: str, file: str) -> None:
    """Reading one image reads its whole row group: say so when that is a lot of memory."""
    largest = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        chunks = map(group.column, range(group.num_columns))
        size = sum(
            c.total_compressed_size for c in chunks if c.path_in_schema.split(".")[0] == column
        )
        largest = max(largest, size)
    if largest > LARGE_ROW_GROUP_BYTES:
        logger.warning(
            "%s: a row group holds %d MiB of images and is read whole to read one of them: "
            "to bound memory, rewrite the file with row groups of at most %d MiB "
            "(pyarrow's row_group_size)",
            file,
            largest >> 20,
            LARGE_ROW_GROUP_BYTES >> 20,
        )


def _image_column_kind(column_type: Any, file: str, column: str) -> str:
    pa = require("pyarrow", "pyarrow")
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return "bytes"
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
        return "bytes"
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return "path"
    raise InvalidInputError(
        f"{file} column {column!r} is {column_type}: an image column holds bytes, "
        "{bytes, path} structs (as Hugging Face datasets writes) or paths/URLs"
    )


def _label_names(schema: Any, column: str) -> list[str] | None:
    """The names of a Hugging Face ClassLabel column, which stores their indices."""
    metadata = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(metadata)["info"]["features"][column] if metadata else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(name) for name in names] if isinstance(names, list) else None
