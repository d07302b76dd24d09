"""The statistics store: index versions, normal classes, dictionary entries, eq. 8 rows.

SQLAlchemy 2 over SQLite (default, in the data directory) or PostgreSQL; the schema
comes from the Alembic migrations in ``bliss.migrations``.

The names below load on first use (PEP 562): importing SQLAlchemy takes most of a second,
and ``bliss --help`` imports this package only to list the ``bliss db`` commands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bliss.store.records import (
        ClassRecord,
        StatisticsMode,
        VersionRecord,
        VersionState,
    )
    from bliss.store.repository import Store

_MODULES = {
    "ClassRecord": "bliss.store.records",
    "StatisticsMode": "bliss.store.records",
    "Store": "bliss.store.repository",
    "VersionRecord": "bliss.store.records",
    "VersionState": "bliss.store.records",
}
__all__ = [
    "ClassRecord",
    "StatisticsMode",
    "Store",
    "VersionRecord",
    "VersionState",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
