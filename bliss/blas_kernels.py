"""Which BLAS kernels run, and a CBLAS handle that multiplies memory-mapped FAISS rows.

Flat search goes through numpy's OpenBLAS rather than faiss-cpu's: faiss-cpu 1.15 bundles
OpenBLAS 0.3.15, which predates AMD Zen 4/5 and falls back to its generic Prescott kernel
there (flat search at 0.16x of numpy's matrix product on a Zen 5 server), while numpy 2.x
bundles a current OpenBLAS that detects the CPU. Neither library's choice is overridden:
an OPENBLAS_CORETYPE in the environment is the user's, and both libraries obey it.

A memory-mapped flat index keeps its rows at byte offset 45 of the file, so they are not
4-byte aligned. ``numpy.matmul`` then skips BLAS altogether (14x slower, measured with
64 queries x 100,000 x 512) and ``numpy.dot`` copies the whole matrix first. OpenBLAS
itself reads unaligned rows at full speed (its packing routines copy them anyway), so
:class:`CblasScores` calls numpy's OpenBLAS directly on the mapped rows.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import threadpoolctl

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# numpy's wheels bundle scipy-openblas: ILP64 symbols end in "64_", LP64 ones have no suffix.
_SYMBOL_SUFFIXES = (("64_", ctypes.c_int64), ("", ctypes.c_int))
# OpenBLAS's portable fallbacks, chosen when it does not recognise the CPU. Measured with
# numpy's OpenBLAS 0.3.31 on a 2-core Sapphire Rapids VM, 64 (1,024) queries x 100,000 x
# 512: SkylakeX, its own pick with nothing set, 51 ms (414 ms); OPENBLAS_CORETYPE=Haswell
# with OPENBLAS_L2_SIZE=512, 59 ms (599 ms); Prescott, which this build serves as Katmai,
# 130 ms (1,530 ms). numpy's own pick is right here, so nothing is forced: a generic
# kernel gets a hint in the start-up line instead.
GENERIC_KERNELS = frozenset({"prescott", "katmai", "core2", "atom", "banias", "generic"})


class CblasScores:
    """``out[B, n] = queries[B, D] @ block[n, D].T`` by numpy's CBLAS, on unaligned rows too.

    ``block`` rows must be contiguous float32 (any row stride that is a whole number of
    floats); ``queries`` and ``out`` C-contiguous float32. One query uses sgemv, which
    reads the block once at memory speed; OpenBLAS's sgemm packs even a single row.
    """

    def __init__(self, library: ctypes.CDLL, suffix: str, integer: type) -> None:
        pointer, real = ctypes.c_void_p, ctypes.c_float
        enums = [ctypes.c_int] * 3
        self._sgemm = getattr(library, f"scipy_cblas_sgemm{suffix}")
        self._sgemm.argtypes = [*enums, integer, integer, integer, real, pointer, integer]
        self._sgemm.argtypes += [pointer, integer, real, pointer, integer]
        self._sgemm.restype = None
        self._sgemv = getattr(library, f"scipy_cblas_sgemv{suffix}")
        self._sgemv.argtypes = [*enums[:2], integer, integer, real, pointer, integer]
        self._sgemv.argtypes += [pointer, integer, real, pointer, integer]
        self._sgemv.restype = None

    @staticmethod
    def accepts(block: np.ndarray) -> bool:
        """Whether ``block`` [n, D] is float32 rows CBLAS can read: lda >= D floats."""
        row_stride, column_stride = block.strides
        whole_rows = row_stride % 4 == 0 and row_stride >= 4 * block.shape[1]
        return block.dtype == np.float32 and column_stride == 4 and whole_rows

    def __call__(self, queries: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
        batch, dim = queries.shape
        rows, stride = len(block), block.strides[0] // 4
        address = block.__array_interface__["data"][0]
        if batch == 1:
            self._sgemv(_ROW_MAJOR, _NO_TRANS, rows, dim, 1.0, address, stride,
                        queries.ctypes.data, 1, 0.0, out.ctypes.data, 1)  # fmt: skip
            return
        self._sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, batch, rows, dim, 1.0, queries.ctypes.data,
                    dim, address, stride, 0.0, out.ctypes.data, rows)  # fmt: skip


@functools.cache
def numpy_cblas() -> CblasScores | None:
    """Numpy's own OpenBLAS as :class:`CblasScores`, or None when numpy uses another BLAS."""
    for library in _blas_libraries():
        if library.get("internal_api") != "openblas" or not _ships_with_numpy(library):
            continue
        handle = ctypes.CDLL(library["filepath"])
        for suffix, integer in _SYMBOL_SUFFIXES:
            if hasattr(handle, f"scipy_cblas_sgemm{suffix}"):
                return CblasScores(handle, suffix, integer)
    return None


def describe_blas() -> str:
    """One line: each loaded BLAS (numpy's, faiss's), its kernel and threads, and the env."""
    import faiss  # noqa: F401  (loaded so that its bundled BLAS is listed)

    libraries = sorted(_blas_libraries(), key=lambda library: not _ships_with_numpy(library))
    parts = [_describe(library) for library in libraries]
    route = "numpy's CBLAS on the mapped rows" if numpy_cblas() else "numpy.matmul on copies"
    parts.append(f"flat search: {route}")
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    parts.append(f"OPENBLAS_CORETYPE={coretype}" if coretype else "OPENBLAS_CORETYPE unset")
    return "; ".join(parts)


def _describe(library: dict[str, Any]) -> str:
    owner = _owner(library)
    kernel = library.get("architecture") or "?"
    text = (
        f"{owner}: {library['internal_api']} {library.get('version') or '?'} {kernel} kernel, "
        f"{library['num_threads']} threads ({library.get('threading_layer', '?')})"
    )
    if kernel.lower() in GENERIC_KERNELS:
        text += " [generic kernel: start with OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell]"
    return text


def _blas_libraries() -> list[dict[str, Any]]:
    return [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def _owner(library: dict[str, Any]) -> str:
    """The package that bundles the library (numpy, faiss_cpu, ...), else its file name."""
    if _ships_with_numpy(library):
        return "numpy"
    path = Path(library["filepath"])
    return path.parent.name[: -len(".libs")] if path.parent.name.endswith(".libs") else path.name


def _ships_with_numpy(library: dict[str, Any]) -> bool:
    """Whether the library is numpy's bundled copy (numpy.libs/ or numpy/.dylibs/)."""
    path = Path(library["filepath"]).resolve()
    return path.parent.name == "numpy.libs" or Path(np.__file__).parent.resolve() in path.parents
