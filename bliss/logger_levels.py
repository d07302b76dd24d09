"""Silencing one third-party logger for the length of one call.

Some libraries log, at WARNING or ERROR, things bliss already handles or reports in its
own words (Ray's token notice, milvus-lite's traceback for a call it does not implement).
Raising that logger's level around the call hides just those lines, and restores it after.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """The logger ``name`` passes only records at ``level`` and above inside the block."""
    target = logging.getLogger(name)
    saved = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(saved)
