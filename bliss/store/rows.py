"""Checks shared by the parts of :class:`bliss.store.Store`: a version's row, its inputs.

The row lookups raise one-line NotFoundError/InvalidInputError naming the version; the
argument checks refuse what the columns cannot hold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePath

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from bliss.errors import InvalidInputError, NotFoundError
from bliss.store.models import IndexVersion
from bliss.store.records import VersionState

INT32_MAX = 2**31 - 1
SHORT_TEXT = 200  # String(200) columns: names, model name, FAISS kind
SHOWN_MISSING = 10  # positions quoted in a NotFoundError
SHA256 = re.compile(r"[0-9a-f]{64}")


def version_label(row: IndexVersion) -> str:
    return f"{row.name}@{row.version}"


def version_row(session: Session, version_id: int, *, lock: bool = False) -> IndexVersion:
    query = select(IndexVersion).where(IndexVersion.id == version_id)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None:
        raise NotFoundError(f"no index version with id {version_id} in the store")
    return row


def building_row(session: Session, version_id: int, action: str) -> IndexVersion:
    # FOR SHARE on PostgreSQL: writers of one version run together, mark_ready waits.
    row = session.scalars(
        select(IndexVersion).where(IndexVersion.id == version_id).with_for_update(read=True)
    ).first()
    if row is None:
        raise NotFoundError(f"no index version with id {version_id} in the store")
    if row.state != VersionState.BUILDING.value:
        raise InvalidInputError(
            f"index {version_label(row)} is {row.state}, so {action} is refused: only building "
            "versions change; build a new version instead"
        )
    return row


def int32_values(positions: np.ndarray) -> list[int]:
    """The positions a query can match (the others are missing by definition)."""
    return positions[(positions >= 0) & (positions <= INT32_MAX)].tolist()


def checked_positions(positions: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(positions)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(
            f"positions must be a 1-D array of integers, got shape {array.shape} and "
            f"dtype {array.dtype}"
        )
    return array.astype(np.int64, copy=False)


def quote_positions(positions: Sequence[int]) -> str:
    shown = ", ".join(str(position) for position in positions[:SHOWN_MISSING])
    more = len(positions) - SHOWN_MISSING
    return f"{shown} (and {more} more)" if more > 0 else shown


def check_short(what: str, value: str) -> None:
    if len(value) > SHORT_TEXT:
        raise InvalidInputError(f"{what} is {len(value)} characters; at most {SHORT_TEXT} fit")


def check_sha256(what: str, value: str | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if value is None or not SHA256.fullmatch(value):
        raise InvalidInputError(f"{what} must be a sha256 hex digest (64 lowercase hex digits)")


def check_relative_path(path: str) -> None:
    if not path or PurePath(path).is_absolute():
        raise InvalidInputError(
            f"FAISS path {path!r} must be a non-empty path relative to the data directory"
        )
