"""A version's serving artifacts: the columnar snapshot a server memory-maps per hit.

Beside ``v<N>.faiss`` the indexer writes ``v<N>.artifacts/``:

- ``entry_text_offsets.npy`` (int64 [t + 1]) and ``entry_texts.utf8``: the dictionary;
- ``entry_mean.npy``, ``entry_std.npy`` (float64 [t, N], table mode): eq. 8, one row per
  entry so that a top-K hit is one contiguous read;
- ``vectors.npy`` (float32 [t, D], IVF-PQ only): exact vectors to re-score the hits;
- ``manifest.json``: format, shapes, and the size and sha256 of every file (the FAISS
  file included), written last; its own sha256 is recorded on the version in the store.

Opening checks only the manifest and file sizes (start-up must not read every byte);
:func:`verify_artifacts` hashes everything (at build, activation and ``bliss index
verify``). Pages are shared through the page cache by every process that maps them.
The store stays the source of truth: the snapshot is written from the same arrays as the
store rows and compared with them when verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError, NotFoundError
from bliss.npy_files import NpyWriter, iter_row_chunks

ARTIFACTS_FORMAT = 1
MANIFEST = "manifest.json"
TEXT_OFFSETS = "entry_text_offsets.npy"
TEXTS = "entry_texts.utf8"
ENTRY_MEAN = "entry_mean.npy"
ENTRY_STD = "entry_std.npy"
VECTORS = "vectors.npy"
_TEXT_BLOCK = 65_536  # entries per write of the text column
_STATISTICS_BLOCK_BYTES = 64 * 1024 * 1024


def artifacts_directory(faiss_file: Path) -> Path:
    """``indexes/<name>/v<N>.artifacts`` beside ``indexes/<name>/v<N>.faiss``."""
    return faiss_file.with_suffix(".artifacts")


@dataclass(frozen=True)
class Manifest:
    format: int
    dictionary_size: int
    classes: int
    files: dict[str, dict[str, int | str]]  # name -> {"bytes": int, "sha256": str}

    def to_bytes(self) -> bytes:
        body = {
            "format": self.format,
            "dictionary_size": self.dictionary_size,
            "classes": self.classes,
            "files": self.files,
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    def paths(
        self, directory: Path, faiss_file: Path
    ) -> Iterator[tuple[Path, dict[str, int | str]]]:
        """Each listed file's path (the FAISS file beside ``directory``) and its entry."""
        for name, entry in self.files.items():
            yield (faiss_file if name == faiss_file.name else directory / name), entry

    @classmethod
    def from_bytes(cls, raw: bytes, where: Path) -> Manifest:
        try:
            body = json.loads(raw)
            return cls(body["format"], body["dictionary_size"], body["classes"], body["files"])
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidInputError(f"{where} is not a bliss artifacts manifest: {error}") from None


class ArtifactsWriter:
    """Writes one version's artifacts; any earlier partial attempt is discarded first."""

    def __init__(self, directory: Path, dictionary_size: int, classes: int) -> None:
        self.directory = directory
        self.dictionary_size = dictionary_size
        self.classes = classes
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    def write_texts(self, texts: Iterable[str]) -> None:
        """The dictionary's texts in position order, streamed."""
        offsets = NpyWriter(self.directory / TEXT_OFFSETS, self.dictionary_size + 1, (), "<i8")
        with offsets, open(self.directory / TEXTS, "wb") as blob:
            position = 0
            offsets.write(np.zeros(1, dtype=np.int64))
            for block in _batches(texts, _TEXT_BLOCK):
                encoded = [text.encode("utf-8") for text in block]
                ends = position + np.cumsum([len(item) for item in encoded], dtype=np.int64)
                blob.write(b"".join(encoded))
                offsets.write(ends)
                position = int(ends[-1])
            blob.flush()
            os.fsync(blob.fileno())

    def write_statistics(self, means: Sequence[np.ndarray], stds: Sequence[np.ndarray]) -> None:
        """Table-mode eq. 8 from per-class columns ([t] each), stored entry-major [t, N]."""
        rows = max(1, _STATISTICS_BLOCK_BYTES // (8 * self.classes))
        for name, columns in ((ENTRY_MEAN, means), (ENTRY_STD, stds)):
            shape = (self.dictionary_size, self.classes)
            with NpyWriter(self.directory / name, shape[0], shape[1:], "<f8") as writer:
                for start in range(0, self.dictionary_size, rows):
                    writer.write(np.stack([c[start : start + rows] for c in columns], axis=1))

    def write_vectors(self, dictionary_file: Path) -> None:
        """A float32 copy of the dictionary embeddings, for exact re-scoring."""
        shape = np.load(dictionary_file, mmap_mode="r").shape
        with NpyWriter(self.directory / VECTORS, shape[0], shape[1:], "<f4") as writer:
            for _, rows in iter_row_chunks(dictionary_file):
                writer.write(rows)

    def finish(self, faiss_file: Path, faiss_checksum: str) -> str:
        """Write the manifest (last, atomically); returns its sha256 for the store.

        ``faiss_checksum`` is the sha256 the FAISS file was saved with (not read again).
        """
        files: dict[str, dict[str, int | str]] = {
            path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(self.directory.iterdir())
            if path.name != MANIFEST
        }
        files[faiss_file.name] = {"bytes": faiss_file.stat().st_size, "sha256": faiss_checksum}
        raw = Manifest(ARTIFACTS_FORMAT, self.dictionary_size, self.classes, files).to_bytes()
        temporary = self.directory / f".{MANIFEST}.tmp"
        with open(temporary, "wb") as stream:
            stream.write(raw)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.directory / MANIFEST)
        return hashlib.sha256(raw).hexdigest()


def read_manifest(directory: Path, faiss_file: Path, expected_checksum: str) -> Manifest:
    """The manifest, checked against the store's checksum and every file's size (cheap)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise NotFoundError(
            f"serving artifacts {directory} are missing: rebuild the version (the indexer "
            "writes them beside the FAISS file)"
        )
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != expected_checksum:
        raise InvalidInputError(
            f"{path} differs from the one the store recorded: the artifacts were changed or "
            "replaced; run `bliss index verify` and rebuild the version"
        )
    manifest = Manifest.from_bytes(raw, path)
    for file, entry in manifest.paths(directory, faiss_file):
        if not file.is_file():
            raise NotFoundError(f"{file} is missing: restore it or rebuild the version")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise InvalidInputError(
                f"{file} has {size} bytes, its manifest says {entry['bytes']}: the file was "
                "truncated or replaced; run `bliss index verify` and rebuild the version"
            )
    return manifest


def verify_artifacts(directory: Path, faiss_file: Path, expected_checksum: str) -> Manifest:
    """:func:`read_manifest` plus the sha256 of every file (reads every byte)."""
    manifest = read_manifest(directory, faiss_file, expected_checksum)
    for file, entry in manifest.paths(directory, faiss_file):
        actual = file_sha256(file)
        if actual != entry["sha256"]:
            raise InvalidInputError(
                f"{file} has sha256 {actual[:12]}..., its manifest says "
                f"{str(entry['sha256'])[:12]}...: the file is corrupt; rebuild the version"
            )
    return manifest


class MappedEntryStatistics:
    """Table-mode eq. 8 from the memory-mapped [t, N] columns."""

    source = "mapped"

    def __init__(self, directory: Path) -> None:
        self.mean = np.load(directory / ENTRY_MEAN, mmap_mode="r")
        self.std = np.load(directory / ENTRY_STD, mmap_mode="r")

    def gather(self, entry_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [B, K, N] rows -> [B, N, K]
        return (
            np.moveaxis(self.mean[entry_ids], -1, 1),
            np.moveaxis(self.std[entry_ids], -1, 1),
        )


class MappedEntryTexts:
    """Dictionary texts from the memory-mapped offsets and UTF-8 blob."""

    def __init__(self, directory: Path) -> None:
        self.offsets = np.load(directory / TEXT_OFFSETS, mmap_mode="r")
        blob = directory / TEXTS
        # np.memmap refuses empty files: a dictionary of empty strings has no bytes.
        self.blob = (
            np.memmap(blob, dtype=np.uint8, mode="r")
            if blob.stat().st_size
            else np.zeros(0, dtype=np.uint8)
        )

    def texts(self, entry_ids: np.ndarray) -> list[str]:
        starts = self.offsets[entry_ids]
        ends = self.offsets[np.asarray(entry_ids) + 1]
        return [
            self.blob[start:end].tobytes().decode("utf-8")
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
        ]


def mapped_vectors(directory: Path) -> np.ndarray:
    """The float32 [t, D] exact vectors of an IVF-PQ version, memory-mapped."""
    return np.load(directory / VECTORS, mmap_mode="r")


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
