"""Keep freed scoring buffers in the process instead of handing them back to the OS.

Scoring a batch allocates a few MiB of float64 temporaries (exact similarities, gathered
statistics) and frees them again. On a thread of the scoring pool glibc serves these
from a per-thread arena that it shrinks after every free, so the next batch page-faults
the same memory back in: measured, Scorer.score on a pool thread took 1.5-2x as long as
on the main thread (D=512, batch 64). Raising glibc's mmap and trim thresholds keeps
that memory mapped; the cost is up to ``trim_threshold`` bytes of free memory kept per
arena. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit systems).
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 128 * 2**20


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    tuned = (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    if not tuned:
        logger.warning("glibc refused the malloc thresholds; scoring may run slower")
    return tuned
