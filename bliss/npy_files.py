"""Streamed .npy files: write rows as they come, read row ranges without memory maps.

Pages of a memory map count in a process's resident set for as long as it is mapped, so
a pass over a 20 GB dictionary through ``np.load(mmap_mode="r")`` shows up as 20 GB of
RSS. Reading row ranges with plain file reads keeps a pass at the size of one chunk;
writing through :class:`NpyWriter` keeps a concatenation at the size of one part.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from bliss.errors import InvalidInputError

# Rows per chunk of a streamed pass: about 64 MiB of float32 at D = 512.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and byte offset of the data of a C-ordered .npy file."""
    with open(path, "rb") as stream:
        major, _ = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(stream)
        offset = stream.tell()
    if fortran:
        raise InvalidInputError(f"{path} is Fortran-ordered: save it C-ordered (np.save default)")
    return tuple(shape), np.dtype(dtype), offset


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a 2-D .npy file, read (not mapped) into a new array."""
    shape, dtype, offset = npy_layout(path)
    stop = min(stop, shape[0])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    rows = np.empty((max(0, stop - start), *shape[1:]), dtype=dtype)
    with open(path, "rb") as stream:
        stream.seek(offset + start * row_bytes)
        if stream.readinto(rows.data.cast("B")) != rows.nbytes:
            raise InvalidInputError(f"{path} is truncated: rebuild or re-copy it")
    return rows


def iter_row_chunks(
    path: Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) chunks of a 2-D .npy file, each about ``chunk_bytes``."""
    shape, dtype, _ = npy_layout(path)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, shape[0], rows):
        yield start, read_rows(path, start, start + rows)


class NpyWriter:
    """Writes a [rows, *row_shape] .npy file part by part; the row count is fixed upfront.

    The file appears under ``path`` only when every row was written and :meth:`close`
    succeeded (temporary name, fsync, rename).
    """

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...], dtype: str) -> None:
        self.path = path
        self.rows = rows
        self.dtype = np.dtype(dtype)
        self.row_shape = row_shape
        self.written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._stream = open(self._temporary, "wb")  # noqa: SIM115 (closed in close())
        # Hashed as written: a 20 GB file is not read back just to learn its checksum.
        self._sha256 = hashlib.sha256()
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": (rows, *row_shape)}
        header_bytes = io.BytesIO()
        np.lib.format.write_array_header_1_0(header_bytes, header)
        self._write_bytes(header_bytes.getvalue())

    def write(self, part: np.ndarray) -> None:
        part = np.ascontiguousarray(part, dtype=self.dtype)
        if part.shape[1:] != self.row_shape or self.written + len(part) > self.rows:
            raise InvalidInputError(
                f"{self.path.name}: a part of shape {part.shape} does not fit "
                f"[{self.rows}, {', '.join(map(str, self.row_shape))}] after {self.written} rows"
            )
        self._write_bytes(part.data.cast("B"))
        self.written += len(part)

    @property
    def checksum(self) -> str:
        """sha256 of the file's bytes so far (the whole file once closed)."""
        return self._sha256.hexdigest()

    def _write_bytes(self, data: bytes | memoryview) -> None:
        self._stream.write(data)
        self._sha256.update(data)

    def close(self) -> Path:
        if self.written != self.rows:
            self.abort()
            raise InvalidInputError(
                f"{self.path.name}: {self.written} of {self.rows} rows written; nothing was kept"
            )
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self._temporary, self.path)
        return self.path

    def abort(self) -> None:
        self._stream.close()
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class NpyRows:
    """A 2-D .npy file that reads row slices on demand: ``rows[a:b]`` is a new array.

    Stands in for ``np.load(path, mmap_mode="r")`` in passes that walk a large matrix in
    row blocks (statistics, ground-truth search) without growing the resident set.
    """

    def __init__(self, path: Path) -> None:
        shape, self.dtype, _ = npy_layout(path)
        if len(shape) != 2:
            raise InvalidInputError(f"{path} has shape {shape}, expected a [rows, D] matrix")
        self.path = path
        self.shape = (int(shape[0]), int(shape[1]))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpyRows supports contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        return read_rows(self.path, start, max(start, stop))
