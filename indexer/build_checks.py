"""Checks a build makes before its heavy work, and a full disk as one line.

Every problem is one line saying what is wrong and what to do. The options that depend
on the inputs (the dictionary's size, the embedding dimension) are checked once those
are known, before the version is created and before anything is encoded or indexed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bliss.dictionary_index import IndexKind, IndexOptions
from bliss.errors import BlissError, InvalidInputError

# Product quantisation trains 2**8 centroids per sub-quantiser on the dictionary itself.
PQ_TRAINING_ENTRIES = 256


class DiskFullError(BlissError):
    """The data directory's file system is full."""


def check_index_fit(index: IndexOptions, entries: int, dim: int) -> None:
    """Refuse approximate-index options that this dictionary cannot be built with."""
    ivf = index.kind in (IndexKind.IVF, IndexKind.IVFPQ)
    if ivf and index.nlist is not None and index.nlist > entries:
        raise InvalidInputError(
            f"--nlist {index.nlist} is larger than the dictionary ({entries:,} entries): "
            f"each IVF list is trained from dictionary entries; use at most {entries:,} "
            "(leave --nlist out for about 4*sqrt(t))"
        )
    if index.kind is not IndexKind.IVFPQ:
        return
    pq_m = index.pq_m or max(1, dim // 8)
    if dim % pq_m:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 64]
        raise InvalidInputError(
            f"--pq-m {pq_m} does not divide the embedding dimension {dim}: use one of "
            f"{', '.join(map(str, divisors))}"
        )
    if entries < PQ_TRAINING_ENTRIES:
        raise InvalidInputError(
            f"--index-kind ivfpq needs at least {PQ_TRAINING_ENTRIES} dictionary entries to "
            f"train its codebooks, the dictionary has {entries:,}: use ivf, hnsw or flat"
        )


@contextmanager
def disk_full_as_error(data_dir: Path) -> Iterator[None]:
    """Turn "no space left on device" into one line that says what to do."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = f" while writing {error.filename}" if error.filename else ""
        raise DiskFullError(
            f"no space left on the device{written} (data directory {data_dir}): free some "
            "space (`bliss index gc` removes what builds left behind), then run the same "
            "command again: the build resumes where it stopped"
        ) from None
