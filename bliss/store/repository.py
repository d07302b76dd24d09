"""The statistics store's API: :class:`Store`, one class composed of a part per concern.

:class:`Store` is the only API the indexer, the server and local scoring use. It returns
frozen dataclasses, never ORM objects, so nothing outside this package holds a session.
Every write is one transaction; writers on SQLite take the write lock up front
(``BEGIN IMMEDIATE``) and on PostgreSQL lock the rows they depend on, so a crash or a bad
input mid-write leaves the store as it was.

Each part is a class over the shared sessions (:mod:`bliss.store.sessions`) in its own
module:

- :mod:`bliss.store.versions`: versions and their lifecycle (create, find, mark ready,
  activate, delete);
- :mod:`bliss.store.classes`: a version's normal classes and calibration;
- :mod:`bliss.store.entries`: dictionary entries;
- :mod:`bliss.store.entry_statistics`: the eq. 8 rows;
- :mod:`bliss.store.leases`: which running servers serve which versions;
- :mod:`bliss.store.build_locks`: one build of a (name, fingerprint) at a time.
"""

from __future__ import annotations

from types import TracebackType

from bliss.store.build_locks import BuildLocks
from bliss.store.classes import ClassesAndCalibration
from bliss.store.database import create_store_engine, display_url, prepare_schema
from bliss.store.entries import DictionaryEntries
from bliss.store.entry_statistics import EntryStatistics
from bliss.store.leases import VersionLeases
from bliss.store.versions import VersionLifecycle


class Store(
    VersionLifecycle,
    ClassesAndCalibration,
    DictionaryEntries,
    EntryStatistics,
    VersionLeases,
    BuildLocks,
):
    """Queries and writes of the statistics store; open with :meth:`Store.open`."""

    @classmethod
    def open(cls, url: str, *, migrate: bool = False) -> Store:
        """Connect to the store at ``url``; ``migrate`` upgrades its schema to head first.

        Without ``migrate`` a store not at this bliss's schema revision raises StoreError.
        """
        engine = create_store_engine(url)
        try:
            prepare_schema(engine, migrate=migrate)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The store's URL with the password hidden."""
        return display_url(self._engine)
