"""The precomputed-embeddings contract: a folder of .npy files the indexer, the evaluation
harness and the benchmarks all exchange.

::

    dictionary.txt      one entry per line (t lines)
    dictionary.npy      float32 [t, D]
    classes.txt         one normal class name per line (N lines)
    class_text.npy      float32 [N, D]  the class-label prompt embeddings C_i
    normal.npy          float32 [n, D]  normal image embeddings
    normal_labels.npy   int [n]         index into classes.txt

Every embedding is L2-normalised on load (a no-op for encoder output). Loading checks
everything and reports the first problem as one line naming the file and the line or row.
The text files are read as ``bliss.dictionaries.read_text_lines`` reads them (lines end
at ``\n`` only), so that ``dictionary.txt`` counts its lines as ``dictionary.npy``'s
writer did.

An *extension* (``bliss index extend --from-embeddings``) is a folder with either or both
halves: ``dictionary.txt`` + ``dictionary.npy`` (entries to add) and ``classes.txt`` +
``normal.npy`` + ``normal_labels.npy`` (normal images to add to existing classes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bliss.dictionaries import read_text_lines
from bliss.errors import InvalidInputError, NotFoundError
from bliss.npy_files import DEFAULT_CHUNK_BYTES, iter_row_chunks, npy_layout

logger = logging.getLogger(__name__)

_NPY_MAGIC = b"\x93NUMPY"
FILES = (
    "dictionary.txt",
    "dictionary.npy",
    "classes.txt",
    "class_text.npy",
    "normal.npy",
    "normal_labels.npy",
)


@dataclass(frozen=True)
class EmbeddingBundle:
    folder: Path
    dictionary_texts: list[str]
    dictionary: np.ndarray  # float32 [t, D] (memory-mapped when no row was dropped)
    class_names: list[str]
    class_text: np.ndarray  # float32 [N, D]
    normal: np.ndarray  # float32 [n, D]
    normal_labels: np.ndarray  # int64 [n]

    @property
    def dim(self) -> int:
        return int(self.dictionary.shape[1])

    def class_members(self, position: int) -> np.ndarray:
        return self.normal[self.normal_labels == position]


def load_bundle(folder: Path) -> EmbeddingBundle:
    """Load and validate a bundle folder; InvalidInputError/NotFoundError name the problem."""
    if not folder.is_dir():
        raise NotFoundError(f"embeddings folder {folder} does not exist")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise NotFoundError(
            f"embeddings folder {folder} lacks {', '.join(missing)} "
            f"(expected files: {', '.join(FILES)})"
        )
    class_names = _read_lines(folder / "classes.txt")
    _reject_duplicate_classes(class_names, folder / "classes.txt")
    class_text = _load_matrix(folder / "class_text.npy", rows=len(class_names), what="classes.txt")
    dim = class_text.shape[1]
    texts = _read_lines(folder / "dictionary.txt")
    dictionary = _load_matrix(
        folder / "dictionary.npy", rows=len(texts), what="dictionary.txt", dim=dim
    )
    normal = _load_matrix(folder / "normal.npy", rows=None, what=None, dim=dim)
    labels = _load_labels(folder / "normal_labels.npy", len(normal), len(class_names))
    _reject_empty_classes(labels, class_names, folder)
    texts, dictionary = _drop_duplicate_entries(texts, dictionary, folder / "dictionary.txt")
    if not _is_unit_norm(dictionary):
        # Normalising needs the whole matrix in memory; encoder output never gets here.
        logger.warning("%s: rows are not L2-normalised; normalising in memory", folder)
        dictionary = _unit_rows(dictionary)
    return EmbeddingBundle(
        folder=folder,
        dictionary_texts=texts,
        dictionary=dictionary,
        class_names=class_names,
        class_text=_unit_rows(class_text),
        normal=_unit_rows(normal),
        normal_labels=labels,
    )


@dataclass(frozen=True)
class EmbeddingExtension:
    folder: Path
    dictionary_texts: list[str]  # entries to add (may be empty)
    dictionary: np.ndarray  # float32 [u, D]
    normal: dict[str, np.ndarray]  # class name -> float32 [n, D] images to add

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.name in FILES)


def load_extension(folder: Path, dim: int, class_names: Sequence[str]) -> EmbeddingExtension:
    """Load an extension folder for a version of dimension ``dim`` with ``class_names``."""
    if not folder.is_dir():
        raise NotFoundError(f"extension folder {folder} does not exist")
    halves = (
        ("dictionary.txt", "dictionary.npy"),
        ("classes.txt", "normal.npy", "normal_labels.npy"),
    )
    present = [all((folder / name).is_file() for name in half) for half in halves]
    for half, complete in zip(halves, present, strict=True):
        partial = [name for name in half if (folder / name).is_file()]
        if partial and not complete:
            raise NotFoundError(
                f"extension folder {folder} has {', '.join(partial)} but not all of "
                f"{', '.join(half)}: add the missing files or remove these"
            )
    if not any(present):
        raise NotFoundError(
            f"extension folder {folder} adds nothing: give dictionary.txt + dictionary.npy "
            "and/or classes.txt + normal.npy + normal_labels.npy"
        )
    texts: list[str] = []
    dictionary = np.zeros((0, dim), dtype=np.float32)
    if present[0]:
        texts = _read_lines(folder / "dictionary.txt")
        matrix = _load_matrix(
            folder / "dictionary.npy", rows=len(texts), what="dictionary.txt", dim=dim
        )
        texts, matrix = _drop_duplicate_entries(texts, matrix, folder / "dictionary.txt")
        dictionary = _unit_rows(matrix)
    return EmbeddingExtension(
        folder, texts, dictionary, _extension_normal(folder, dim, class_names) if present[1] else {}
    )


def _extension_normal(folder: Path, dim: int, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    names = _read_lines(folder / "classes.txt")
    _reject_duplicate_classes(names, folder / "classes.txt")
    unknown = [name for name in names if name not in class_names]
    if unknown:
        raise InvalidInputError(
            f"{folder / 'classes.txt'} names {unknown[0]!r}, not a class of the version: "
            f"extend adds images to its classes ({', '.join(class_names)}); build a new index "
            "for new classes"
        )
    normal = _unit_rows(_load_matrix(folder / "normal.npy", rows=None, what=None, dim=dim))
    labels = _load_labels(folder / "normal_labels.npy", len(normal), len(names))
    return {name: normal[labels == position] for position, name in enumerate(names)}


def write_bundle(
    folder: Path,
    *,
    dictionary_texts: Sequence[str],
    dictionary: np.ndarray,
    class_names: Sequence[str],
    class_text: np.ndarray,
    normal: np.ndarray,
    normal_labels: np.ndarray,
) -> None:
    """Write a bundle (used by evaluation caches, benchmarks and tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dictionary.txt").write_text("".join(f"{t}\n" for t in dictionary_texts), "utf-8")
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in class_names), "utf-8")
    np.save(folder / "dictionary.npy", np.asarray(dictionary, dtype=np.float32))
    np.save(folder / "class_text.npy", np.asarray(class_text, dtype=np.float32))
    np.save(folder / "normal.npy", np.asarray(normal, dtype=np.float32))
    np.save(folder / "normal_labels.npy", np.asarray(normal_labels, dtype=np.int64))


def load_numeric_array(path: Path, *, mmap: bool = False) -> np.ndarray:
    """An .npy file; an empty, truncated, non-.npy or pickled one is one line naming it."""
    with open(path, "rb") as stream:
        magic = stream.read(len(_NPY_MAGIC))
    if not magic:
        raise InvalidInputError(f"{path} is empty (0 bytes): write it with numpy.save")
    if magic != _NPY_MAGIC:
        raise InvalidInputError(
            f"{path} is not a .npy file (no NumPy header): write it with numpy.save"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except EOFError:
        raise InvalidInputError(
            f"{path} is truncated (its header is cut off): write it again"
        ) from None
    except ValueError as error:
        if "pickled" in str(error) or "Object arrays" in str(error):
            reason = "it holds Python objects (a pickled or object array), not numbers"
        elif "mmap length" in str(error) or "not fully written" in str(error):
            reason = "it is shorter than its header says (truncated)"
        else:
            reason = str(error)
        raise InvalidInputError(
            f"{path} is not a usable numeric .npy array: {reason}; write it again with numpy.save"
        ) from None


def load_embeddings_file(path: Path) -> np.ndarray:
    """A [B, D] .npy file of embeddings to score, memory-mapped (rows are checked later)."""
    if not path.is_file():
        raise NotFoundError(f"embeddings file {path} does not exist")
    embeddings = load_numeric_array(path, mmap=True)
    if embeddings.ndim != 2:
        raise InvalidInputError(f"{path} has shape {embeddings.shape}, expected [B, D]")
    return embeddings


def _read_lines(path: Path) -> list[str]:
    with open(path, "rb") as stream:
        lines = [line for _, line in read_text_lines(stream, str(path))]
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise InvalidInputError(
            f"{path} line {blank[0]} is empty (or only spaces): every line must be one entry"
        )
    if not lines:
        raise InvalidInputError(f"{path} is empty: it needs one entry per line")
    return [line.strip() for line in lines]


def _load_matrix(
    path: Path, *, rows: int | None, what: str | None, dim: int | None = None
) -> np.ndarray:
    matrix = load_numeric_array(path, mmap=True)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise InvalidInputError(f"{path} has shape {matrix.shape}, expected a non-empty 2-D array")
    if not np.issubdtype(matrix.dtype, np.floating):
        raise InvalidInputError(f"{path} has dtype {matrix.dtype}, expected float32")
    if rows is not None and matrix.shape[0] != rows:
        raise InvalidInputError(f"{path} has {matrix.shape[0]} rows but {what} has {rows} lines")
    if dim is not None and matrix.shape[1] != dim:
        raise InvalidInputError(
            f"{path} has dimension {matrix.shape[1]} but class_text.npy has {dim}: "
            "all embeddings must come from the same model"
        )
    _reject_bad_rows(matrix, path)
    return matrix


def _row_chunks(matrix: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """float32 chunks of rows; a memory map is read with plain reads, so that a pass
    over a huge dictionary does not leave all of it in the resident set."""
    if isinstance(matrix, np.memmap) and _maps_whole_file(matrix):
        assert matrix.filename is not None, "_maps_whole_file checked it"
        for start, block in iter_row_chunks(Path(matrix.filename)):
            yield start, block.astype(np.float32, copy=False)
        return
    rows = max(1, DEFAULT_CHUNK_BYTES // max(1, 4 * matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        yield start, np.asarray(matrix[start : start + rows], dtype=np.float32)


def _maps_whole_file(matrix: np.memmap) -> bool:
    path = Path(matrix.filename) if matrix.filename else None
    return path is not None and path.suffix == ".npy" and npy_layout(path)[0] == matrix.shape


def _reject_bad_rows(matrix: np.ndarray, path: Path) -> None:
    for start, block in _row_chunks(matrix):
        bad = ~np.isfinite(block).all(axis=1) | ~block.any(axis=1)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise InvalidInputError(f"{path} row {row} contains NaN, inf or only zeros")


def _is_unit_norm(matrix: np.ndarray) -> bool:
    for _, block in _row_chunks(matrix):
        if np.abs(np.linalg.norm(block, axis=1) - 1.0).max() > 1e-4:
            return False
    return True


def _load_labels(path: Path, count: int, classes: int) -> np.ndarray:
    labels = load_numeric_array(path)
    if labels.ndim != 1 or labels.shape[0] != count:
        raise InvalidInputError(
            f"{path} has shape {labels.shape}, expected [{count}] (one per normal.npy row)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"{path} has dtype {labels.dtype}, expected integers")
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(outside):
        row = int(outside[0])
        raise InvalidInputError(
            f"{path} row {row} is label {int(labels[row])}, outside 0..{classes - 1} (classes.txt)"
        )
    return labels.astype(np.int64)


def _reject_duplicate_classes(names: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for line, name in enumerate(names, start=1):
        if name in seen:
            raise InvalidInputError(
                f"{path} lists class {name!r} twice (lines {seen[name]} and {line})"
            )
        seen[name] = line


def _reject_empty_classes(labels: np.ndarray, names: list[str], folder: Path) -> None:
    counts = np.bincount(labels, minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InvalidInputError(
            f"class {empty[0]!r} has no normal images in {folder / 'normal_labels.npy'}: "
            "every class needs at least one"
        )


def _drop_duplicate_entries(
    texts: list[str], dictionary: np.ndarray, path: Path
) -> tuple[list[str], np.ndarray]:
    first: dict[str, int] = {}
    for row, text in enumerate(texts):
        first.setdefault(text, row)
    if len(first) == len(texts):
        return texts, dictionary
    keep = np.array(sorted(first.values()))
    logger.warning(
        "%s: %d duplicate entries dropped (first occurrence kept)", path, len(texts) - len(keep)
    )
    return [texts[i] for i in keep], np.asarray(dictionary[keep])


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)
