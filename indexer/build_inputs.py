"""What a build reads: a folder of class image folders, or a precomputed-embeddings bundle.

Both give the pipeline the same four things: the class names, the class-label prompt
embeddings, the dictionary (texts and an embeddings file) and a file of each class's
normal embeddings. Files, not arrays, so that Ray workers can read them too. The image
source encodes them with the model, chunk by chunk into the build workspace, so a killed
build re-encodes nothing it already finished.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from bliss.checksums import file_sha256
from bliss.embedding_bundle import EmbeddingBundle
from bliss.errors import InvalidInputError
from bliss.indexer.image_sources import ImageClass
from bliss.indexer.workspace import BuildWorkspace, Provenance, digest
from bliss.npy_files import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    from bliss.dictionaries import Dictionary
    from bliss.indexer.executors import ChunkEncoder

logger = logging.getLogger(__name__)

# Items encoded per resumable chunk: a killed build loses at most one chunk's work.
DEFAULT_CHUNK_SIZE = 2048


class BuildInputs(Protocol):
    """The inputs of one build, whatever their origin."""

    @property
    def class_names(self) -> list[str]: ...

    def fingerprint(self) -> str:
        """Changes whenever the inputs do; part of the build's identity."""
        ...

    @property
    def embedding_dim(self) -> int: ...

    def class_sizes(self) -> list[int]:
        """The number of normal images of each class, by position."""
        ...

    def dictionary_size(self, workspace: BuildWorkspace) -> int:
        """The number of (de-duplicated) dictionary entries t."""
        ...

    def dictionary_texts(self, workspace: BuildWorkspace) -> Iterator[str]:
        """The dictionary's texts, streamed, by position."""
        ...

    def dictionary_file(self, workspace: BuildWorkspace) -> Path:
        """An .npy file of the dictionary's unit-norm float32 embeddings [t, D]."""
        ...

    def label_embeddings(self, workspace: BuildWorkspace) -> np.ndarray:
        """The class-label prompt embeddings C_i, float32 [N, D]."""
        ...

    def class_embeddings_file(self, workspace: BuildWorkspace, position: int) -> Path:
        """An .npy file of class ``position``'s normal image embeddings, float32 [n_i, D]."""
        ...

    def release_encoder(self) -> None:
        """Free the model once everything is encoded (a no-op when there is none)."""
        ...


class BundleInputs:
    """A precomputed-embeddings bundle (see ``bliss.embedding_bundle``)."""

    def __init__(self, bundle: EmbeddingBundle) -> None:
        self.bundle = bundle

    @property
    def class_names(self) -> list[str]:
        return self.bundle.class_names

    def fingerprint(self) -> str:
        hasher = hashlib.sha256()
        for name in sorted(p.name for p in self.bundle.folder.iterdir() if p.is_file()):
            hasher.update(name.encode())
            hasher.update(file_sha256(self.bundle.folder / name).encode())
        return hasher.hexdigest()

    @property
    def embedding_dim(self) -> int:
        return self.bundle.dim

    def class_sizes(self) -> list[int]:
        counts = np.bincount(self.bundle.normal_labels, minlength=len(self.class_names))
        return counts.tolist()

    def dictionary_size(self, workspace: BuildWorkspace) -> int:
        return len(self.bundle.dictionary_texts)

    def dictionary_texts(self, workspace: BuildWorkspace) -> Iterator[str]:
        return iter(self.bundle.dictionary_texts)

    def dictionary_file(self, workspace: BuildWorkspace) -> Path:
        dictionary = self.bundle.dictionary
        # Still the memory map of the bundle's own file: nothing was dropped or normalised.
        if isinstance(dictionary, np.memmap) and dictionary.dtype == np.float32:
            assert dictionary.filename is not None, "the bundle maps a file"
            return Path(dictionary.filename)
        # The bundle's content is part of the build's identity: its checksum says enough.
        produced_by = {"bundle": "dictionary.npy"}
        if not workspace.reusable("dictionary.npy", produced_by):
            rows = max(1, DEFAULT_CHUNK_BYTES // (4 * self.embedding_dim))
            shape = dictionary.shape
            with workspace.npy_writer("dictionary.npy", shape[0], shape[1:], produced_by) as writer:
                for start in range(0, shape[0], rows):
                    writer.write(dictionary[start : start + rows])
        return workspace.path("dictionary.npy")

    def label_embeddings(self, workspace: BuildWorkspace) -> np.ndarray:
        return self.bundle.class_text

    def class_embeddings_file(self, workspace: BuildWorkspace, position: int) -> Path:
        output = f"normals/class_{position:05d}.npy"
        if not workspace.reusable(output, {"bundle": "normal.npy"}):
            workspace.save_array(
                self.bundle.class_members(position), output, {"bundle": "normal.npy"}
            )
        return workspace.path(output)

    def release_encoder(self) -> None:
        pass


class ImageFolderInputs:
    """Class image folders plus a dictionary, encoded with an open_clip model."""

    def __init__(
        self,
        classes: list[ImageClass],
        dictionary: Dictionary,
        load_encoder: Callable[[], ChunkEncoder],
        prompt_template: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        encoding: Provenance | None = None,
    ) -> None:
        """``encoding``: what else changes the embeddings (batch size, device, backend).

        Encoded chunks are reused on resumption only when it matches, so a resumed build
        never mixes embeddings computed under different settings.
        """
        if chunk_size < 1:
            raise InvalidInputError(f"the encoding chunk size must be at least 1, got {chunk_size}")
        self.classes = classes
        self.dictionary_source = dictionary
        self._load_encoder = load_encoder
        self.prompt_template = prompt_template
        self.chunk_size = chunk_size
        self.encoding = dict(encoding or {})

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @cached_property
    def encoder(self) -> ChunkEncoder:
        return self._load_encoder()

    def fingerprint(self) -> str:
        """Every image's identity (key, size, mtime or etag), by class, plus the dictionary."""
        hasher = hashlib.sha256(self.dictionary_source.fingerprint().encode())
        for image_class in self.classes:
            hasher.update(f"class\0{image_class.name}\0".encode())
            for item in image_class.files:
                hasher.update(f"{item.identity()}\0".encode())
        return hasher.hexdigest()

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def class_sizes(self) -> list[int]:
        return [len(image_class.files) for image_class in self.classes]

    def dictionary_size(self, workspace: BuildWorkspace) -> int:
        return sum(1 for _ in self.dictionary_texts(workspace))

    def dictionary_texts(self, workspace: BuildWorkspace) -> Iterator[str]:
        self._write_texts(workspace)
        return workspace.iter_lines("dictionary.txt")

    def dictionary_file(self, workspace: BuildWorkspace) -> Path:
        return self._encode_in_chunks(
            workspace,
            "dictionary.npy",
            lambda: self.dictionary_texts(workspace),
            str,
            lambda chunks: self.encoder.encode_prompts(chunks, self.prompt_template),
            "encode dictionary",
        )

    def _write_texts(self, workspace: BuildWorkspace) -> None:
        """Freeze the dictionary's entries once, so every stage sees the same positions."""
        produced_by = {"dictionary": self._dictionary_fingerprint}
        if not workspace.reusable("dictionary.txt", produced_by):
            workspace.save_lines(self.dictionary_source.entries(), "dictionary.txt", produced_by)

    @cached_property
    def _dictionary_fingerprint(self) -> str:
        return self.dictionary_source.fingerprint()

    def label_embeddings(self, workspace: BuildWorkspace) -> np.ndarray:
        produced_by = {"classes": self.class_names, **self.encoding}
        if not workspace.reusable("labels.npy", produced_by):
            (labels,) = self.encoder.encode_prompts([self.class_names], self.prompt_template)
            workspace.save_array(labels, "labels.npy", produced_by)
        return workspace.load_array("labels.npy")

    def class_embeddings_file(self, workspace: BuildWorkspace, position: int) -> Path:
        image_class = self.classes[position]
        return self._encode_in_chunks(
            workspace,
            f"normals/class_{position:05d}.npy",
            lambda: iter(image_class.files),
            lambda item: item.identity(),
            self.encoder.encode_images,
            f"encode {image_class.name!r}",
        )

    def release_encoder(self) -> None:
        encoder = self.__dict__.pop("encoder", None)  # only if the cached property ran
        if encoder is not None:
            encoder.close()

    def _encode_in_chunks(
        self,
        workspace: BuildWorkspace,
        output: str,
        items: Callable[[], Iterator[Any]],
        identify: Callable[[Any], str],
        encode: Callable[[Iterator[list[Any]]], Iterator[np.ndarray]],
        description: str,
    ) -> Path:
        """Encode ``items()`` chunk by chunk into ``output`` (a workspace .npy file).

        Each chunk is saved with a record of exactly which items it holds and how they
        were encoded; a resumed run reuses the chunks whose record matches and encodes
        the rest. ``items()`` is read again rather than held, so a dictionary of tens of
        millions of entries streams through in chunks.
        """
        chunks = _plan_chunks(output, items(), identify, self.chunk_size, self.encoding)
        produced_by = {
            "chunks": digest(*(chunk.produced_by["items"] for chunk in chunks)),
            "chunk_size": self.chunk_size,
            **self.encoding,
        }
        if workspace.reusable(output, produced_by):
            return workspace.path(output)
        pending = [
            chunk
            for chunk in chunks
            if not workspace.reusable(chunk.name, chunk.produced_by, rows=chunk.rows)
        ]
        if len(pending) < len(chunks):
            logger.info(
                "%s: resuming, %d of %d chunks already encoded",
                description,
                len(chunks) - len(pending),
                len(chunks),
            )
        total = chunks[-1].stop if chunks else 0
        done = total - sum(chunk.rows for chunk in pending)
        with tqdm(total=total, initial=done, desc=description, unit="item") as progress:
            encoded = encode(_chunk_items(items(), pending, self.chunk_size))
            for chunk, embeddings in zip(pending, encoded, strict=True):
                if len(embeddings) != chunk.rows:
                    raise InvalidInputError(
                        f"{description}: the encoder returned {len(embeddings)} embeddings for "
                        f"the {chunk.rows} items {chunk.start}..{chunk.stop - 1}"
                    )
                workspace.save_array(embeddings, chunk.name, chunk.produced_by)
                progress.update(chunk.rows)
        return _assemble(workspace, output, chunks, produced_by)


@dataclass(frozen=True)
class _Chunk:
    """Items ``start:stop`` of one encoding, and what its saved embeddings must match."""

    name: str
    start: int
    stop: int
    produced_by: dict[str, Any]

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _plan_chunks(
    output: str,
    items: Iterator[Any],
    identify: Callable[[Any], str],
    size: int,
    encoding: Mapping[str, Any],
) -> list[_Chunk]:
    folder = output.removesuffix(".npy") + "_chunks"
    chunks = []
    for start, block in _batched(items, size):
        stop = start + len(block)
        chunks.append(
            _Chunk(
                f"{folder}/{start:012d}-{stop:012d}.npy",
                start,
                stop,
                {"items": digest(*map(identify, block)), "start": start, "stop": stop, **encoding},
            )
        )
    if not chunks:
        raise InvalidInputError(f"nothing to encode for {output}")
    return chunks


def _chunk_items(items: Iterator[Any], chunks: list[_Chunk], size: int) -> Iterator[list[Any]]:
    """The items of ``chunks`` (ascending, a subset of the plan), read from ``items``."""
    wanted = {chunk.start for chunk in chunks}
    for start, block in _batched(items, size):
        if start in wanted:
            yield block


def _batched(items: Iterator[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """(start, up to ``size`` items) blocks of ``items``, read lazily."""
    start = 0
    while block := list(itertools.islice(items, size)):
        yield start, block
        start += len(block)


def _assemble(
    workspace: BuildWorkspace, output: str, chunks: list[_Chunk], produced_by: Mapping[str, Any]
) -> Path:
    """Stream the chunks into ``output``, then drop them (the output's record replaces theirs)."""
    first = workspace.load_array(chunks[0].name, mmap=True)
    with workspace.npy_writer(output, chunks[-1].stop, first.shape[1:], produced_by) as writer:
        for chunk in chunks:
            writer.write(workspace.load_array(chunk.name))
    for chunk in chunks:
        workspace.discard(chunk.name)
    return workspace.path(output)
