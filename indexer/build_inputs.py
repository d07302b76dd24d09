"""What a build reads: a folder of class image folders, or a precomputed-embeddings bundle.

Both give the pipeline the same four things: the class names, the class-label prompt
embeddings, the dictionary (texts and an embeddings file) and a file of each class's
normal embeddings. Files, not arrays, so that Ray workers can read them too. The image
source encodes them with the model, chunk by chunk into the build workspace, so a killed
build re-encodes nothing it already finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from bliss.checksums import file_sha256
from bliss.embedding_bundle import EmbeddingBundle
from bliss.errors import InvalidInputError, NotFoundError
from bliss.indexer.workspace import BuildWorkspace
from bliss.npy_files import DEFAULT_CHUNK_BYTES, NpyWriter

if TYPE_CHECKING:
    from bliss.dictionaries import Dictionary
    from bliss.indexer.executors import ChunkEncoder

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
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
        digest = hashlib.sha256()
        for name in sorted(p.name for p in self.bundle.folder.iterdir() if p.is_file()):
            digest.update(name.encode())
            digest.update(file_sha256(self.bundle.folder / name).encode())
        return digest.hexdigest()

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
            return Path(dictionary.filename)
        if not workspace.has("dictionary.npy"):
            rows = max(1, DEFAULT_CHUNK_BYTES // (4 * self.embedding_dim))
            shape = dictionary.shape
            with NpyWriter(workspace.path("dictionary.npy"), shape[0], shape[1:], "<f4") as writer:
                for start in range(0, shape[0], rows):
                    writer.write(dictionary[start : start + rows])
        return workspace.path("dictionary.npy")

    def label_embeddings(self, workspace: BuildWorkspace) -> np.ndarray:
        return self.bundle.class_text

    def class_embeddings_file(self, workspace: BuildWorkspace, position: int) -> Path:
        name = f"class_{position:05d}.npy"
        if not workspace.has("normals", name):
            workspace.save_array(self.bundle.class_members(position), "normals", name)
        return workspace.path("normals", name)

    def release_encoder(self) -> None:
        pass


@dataclass(frozen=True)
class ImageClass:
    name: str
    folder: Path
    files: tuple[Path, ...]


def scan_image_folder(root: Path, class_map: Path | None = None) -> list[ImageClass]:
    """One class per sub-folder (sorted by folder name); ``class_map`` renames them."""
    if not root.is_dir():
        raise NotFoundError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InvalidInputError(
            f"{root} has no class sub-folders: put each class's images in {root}/<class>/"
        )
    names = _class_names(folders, class_map)
    classes = []
    for folder in folders:
        files = tuple(sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        if not files:
            raise InvalidInputError(
                f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        classes.append(ImageClass(names[folder.name], folder, files))
    return classes


class ImageFolderInputs:
    """Class image folders plus a dictionary, encoded with an open_clip model."""

    def __init__(
        self,
        classes: list[ImageClass],
        dictionary: Dictionary,
        load_encoder: Callable[[], ChunkEncoder],
        prompt_template: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise InvalidInputError(f"the encoding chunk size must be at least 1, got {chunk_size}")
        self.classes = classes
        self.dictionary_source = dictionary
        self._load_encoder = load_encoder
        self.prompt_template = prompt_template
        self.chunk_size = chunk_size

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @cached_property
    def encoder(self) -> ChunkEncoder:
        return self._load_encoder()

    def fingerprint(self) -> str:
        """Names, sizes and modification times of every image, plus the dictionary."""
        digest = hashlib.sha256(self.dictionary_source.fingerprint().encode())
        for image_class in self.classes:
            digest.update(f"class\0{image_class.name}\0".encode())
            for path in image_class.files:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return digest.hexdigest()

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def class_sizes(self) -> list[int]:
        return [len(image_class.files) for image_class in self.classes]

    def dictionary_size(self, workspace: BuildWorkspace) -> int:
        self._write_texts(workspace)
        return sum(1 for _ in workspace.iter_lines("dictionary.txt"))

    def dictionary_texts(self, workspace: BuildWorkspace) -> Iterator[str]:
        self._write_texts(workspace)
        return workspace.iter_lines("dictionary.txt")

    def dictionary_file(self, workspace: BuildWorkspace) -> Path:
        if not workspace.has("dictionary.npy"):
            self._encode_in_chunks(
                workspace,
                "dictionary_chunks",
                list(self.dictionary_texts(workspace)),
                lambda chunks: self.encoder.encode_prompts(chunks, self.prompt_template),
                "encode dictionary",
                "dictionary.npy",
            )
        return workspace.path("dictionary.npy")

    def _write_texts(self, workspace: BuildWorkspace) -> None:
        """Freeze the dictionary's entries once, so every stage sees the same positions."""
        if not workspace.has("dictionary.txt"):
            workspace.save_lines(self.dictionary_source.entries(), "dictionary.txt")

    def label_embeddings(self, workspace: BuildWorkspace) -> np.ndarray:
        if not workspace.has("labels.npy"):
            (labels,) = self.encoder.encode_prompts([self.class_names], self.prompt_template)
            workspace.save_array(labels, "labels.npy")
        return workspace.load_array("labels.npy")

    def class_embeddings_file(self, workspace: BuildWorkspace, position: int) -> Path:
        name = f"class_{position:05d}.npy"
        if not workspace.has("normals", name):
            image_class = self.classes[position]
            self._encode_in_chunks(
                workspace,
                f"normals/class_{position:05d}_chunks",
                list(image_class.files),
                self.encoder.encode_images,
                f"encode {image_class.name!r}",
                f"normals/{name}",
            )
        return workspace.path("normals", name)

    def release_encoder(self) -> None:
        encoder = self.__dict__.pop("encoder", None)  # only if the cached property ran
        if encoder is not None:
            encoder.close()

    def _encode_in_chunks(
        self,
        workspace: BuildWorkspace,
        folder: str,
        items: Sequence,
        encode: Callable[[list[Sequence]], Iterator[np.ndarray]],
        description: str,
        output: str,
    ) -> None:
        """Encode ``items`` chunk by chunk into ``output`` (a workspace .npy file).

        Chunks a previous run already wrote are skipped; the chunks are then streamed into
        the output one at a time, never concatenated in memory.
        """
        size = self.chunk_size
        chunks = {
            f"{i:06d}.npy": items[s : s + size] for i, s in enumerate(range(0, len(items), size))
        }
        done = {name for name in chunks if workspace.has(folder, name)}
        if done:
            logger.info(
                "%s: resuming, %d of %d chunks already encoded", description, len(done), len(chunks)
            )
        already = sum(len(chunks[name]) for name in done)
        pending = [name for name in chunks if name not in done]
        with tqdm(total=len(items), initial=already, desc=description, unit="item") as progress:
            encoded = encode([chunks[name] for name in pending])
            for name, embeddings in zip(pending, encoded, strict=True):
                workspace.save_array(embeddings, folder, name)
                progress.update(len(chunks[name]))
        first = workspace.load_array(folder, next(iter(chunks)), mmap=True)
        with NpyWriter(workspace.path(output), len(items), first.shape[1:], "<f4") as writer:
            for name in chunks:
                writer.write(workspace.load_array(folder, name))


def _class_names(folders: list[Path], class_map: Path | None) -> dict[str, str]:
    names = {folder.name: folder.name for folder in folders}
    if class_map is not None:
        mapping = _read_class_map(class_map)
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise InvalidInputError(f"{class_map} maps folder {unknown[0]!r}, which does not exist")
        names.update(mapping)
    seen: dict[str, str] = {}
    for folder, name in names.items():
        if name in seen:
            raise InvalidInputError(
                f"folders {seen[name]!r} and {folder!r} both map to class {name!r}"
            )
        seen[name] = folder
    return names


def _read_class_map(path: Path) -> dict[str, str]:
    """A JSON object {folder: label}, or lines 'folder<TAB>label'."""
    if not path.is_file():
        raise NotFoundError(f"class map {path} does not exist")
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise InvalidInputError(f"{path} must be a JSON object mapping folder names to labels")
        return {str(k): v.strip() for k, v in mapping.items()}
    mapping = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        folder, separator, label = line.partition("\t")
        if not separator or not label.strip():
            raise InvalidInputError(f"{path} line {number}: expected 'folder<TAB>label'")
        mapping[folder.strip()] = label.strip()
    return mapping
