"""The store's sessions: one read and one write session factory over one engine.

Every query runs in one transaction. Writers on SQLite take the write lock up front
(``BEGIN IMMEDIATE``), so concurrent writers queue on the busy timeout instead of failing
when they upgrade a read lock; connection failures become one-line StoreErrors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bliss.store.database import WRITE_OPTIONS, store_operational_error


class StoreSessions:
    """The engine and its session factories, shared by every part of :class:`Store`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._read_sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            engine.execution_options(**WRITE_OPTIONS), expire_on_commit=False
        )

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        try:
            with self._read_sessions() as session, session.begin():
                yield session
        except OperationalError as error:
            raise store_operational_error(self._engine, error) from error

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        try:
            with self._write_sessions() as session, session.begin():
                yield session
        except OperationalError as error:
            raise store_operational_error(self._engine, error) from error


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
