"""Build locks: two builds of the same (name, fingerprint) never run at once.

The first takes the lock and does the work; the second stops at once with one line
naming the first (or, asked to wait, waits and then finds the finished version).

- PostgreSQL: a session advisory lock on a connection held for the whole build; the
  database drops it when the process dies. A ``build_locks`` row says who holds it.
- SQLite: the ``build_locks`` row is the lock, taken in a write transaction. Its owner
  renews ``heartbeat_at`` from a thread; a row whose owner is gone (a dead pid on this
  host, or no heartbeat for :data:`LOCK_STALE_S`) is taken over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, CursorResult, delete, text, update
from sqlalchemy.exc import OperationalError

from bliss.errors import BlissError
from bliss.store.database import store_operational_error
from bliss.store.models import BuildLock
from bliss.store.records import BuildLockRecord, build_lock_record
from bliss.store.sessions import StoreSessions, utc_now

logger = logging.getLogger(__name__)

LOCK_HEARTBEAT_S = 15.0
# Longer than the longest write transaction a build makes (the heartbeat queues behind it).
LOCK_STALE_S = 300.0
LOCK_WAIT_POLL_S = 1.0


class BuildInProgressError(BlissError):
    """Another process is running the same build."""


class HeldBuildLock(ABC):
    """A build lock this process holds; :meth:`release` it when the build ends."""

    @abstractmethod
    def release(self) -> None: ...


class BuildLocks(StoreSessions):
    """The build-lock methods of :class:`bliss.store.Store`."""

    @contextmanager
    def build_lock(self, name: str, fingerprint: str, *, wait: bool = False) -> Iterator[None]:
        """Hold the lock of the build (name, fingerprint) for the block.

        Held elsewhere: BuildInProgressError naming the holder, or with ``wait`` a wait
        until it is free.
        """
        lock = self.try_build_lock(name, fingerprint)
        if lock is None and not wait:
            raise BuildInProgressError(
                f"{_describe(name, self.build_lock_holder(name, fingerprint))}: it makes the "
                "same version, so this one stops; add --wait to wait for it, or run this "
                "again once it has ended"
            )
        if lock is None:
            logger.info(
                "%s; waiting for it to end",
                _describe(name, self.build_lock_holder(name, fingerprint)),
            )
        while lock is None:
            time.sleep(LOCK_WAIT_POLL_S)
            lock = self.try_build_lock(name, fingerprint)
        try:
            yield
        finally:
            lock.release()

    def try_build_lock(self, name: str, fingerprint: str) -> HeldBuildLock | None:
        """The lock of the build (name, fingerprint), or None when a live build holds it."""
        token = secrets.token_hex(16)
        if self.dialect == "postgresql":
            return self._try_advisory_lock(name, fingerprint, token)
        if not self._claim_row(name, fingerprint, token, take_over=False):
            return None
        return _RowLock(self, name, fingerprint, token)

    def _try_advisory_lock(self, name: str, fingerprint: str, token: str) -> HeldBuildLock | None:
        key = _advisory_key(name, fingerprint)
        try:
            # A connection of its own, held for the whole build: the lock lives with it.
            connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                taken = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
            except BaseException:
                connection.close()
                raise
        except OperationalError as error:
            raise store_operational_error(self._engine, error) from error
        if not taken:
            connection.close()
            return None
        lock = _AdvisoryLock(self, name, fingerprint, token, connection, key)
        try:
            self._claim_row(name, fingerprint, token, take_over=True)
        except BaseException:
            lock.release()
            raise
        return lock

    def build_lock_holder(self, name: str, fingerprint: str) -> BuildLockRecord | None:
        """Who holds (or last held) the lock of (name, fingerprint), as its row says."""
        with self._reading() as session:
            row = session.get(BuildLock, (name, fingerprint))
            return None if row is None else build_lock_record(row)

    def _claim_row(self, name: str, fingerprint: str, token: str, *, take_over: bool) -> bool:
        """Write this process's row; without ``take_over`` only over an abandoned one."""
        now = utc_now()
        with self._writing() as session:
            row = session.get(BuildLock, (name, fingerprint))
            if row is None:
                row = BuildLock(name=name, fingerprint=fingerprint)
                session.add(row)
            elif not take_over:
                holder = build_lock_record(row)
                if not _abandoned(holder, now):
                    return False
                logger.warning(
                    "taking over the build lock of %s from pid %d on %s (%s)",
                    name,
                    holder.pid,
                    holder.host,
                    "that process is gone"
                    if holder.host == _HOST
                    else f"no heartbeat since {holder.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC",
                )
            row.owner, row.host, row.pid = token, _HOST, os.getpid()
            row.acquired_at = row.heartbeat_at = now
        return True

    def _renew_row(self, name: str, fingerprint: str, token: str) -> bool:
        with self._writing() as session:
            # An UPDATE's result is a CursorResult; Session.execute is typed as Result.
            renewed = cast(
                CursorResult[Any],
                session.execute(
                    update(BuildLock)
                    .where(
                        BuildLock.name == name,
                        BuildLock.fingerprint == fingerprint,
                        BuildLock.owner == token,
                    )
                    .values(heartbeat_at=utc_now())
                ),
            )
            return renewed.rowcount == 1

    def _drop_row(self, name: str, fingerprint: str, token: str) -> None:
        with self._writing() as session:
            session.execute(
                delete(BuildLock).where(
                    BuildLock.name == name,
                    BuildLock.fingerprint == fingerprint,
                    BuildLock.owner == token,
                )
            )


class _RowLock(HeldBuildLock):
    """SQLite: the row, kept fresh by a heartbeat thread until released."""

    def __init__(self, store: BuildLocks, name: str, fingerprint: str, token: str) -> None:
        self._store, self._key, self._token = store, (name, fingerprint), token
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"bliss-build-lock-{name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                if not self._store._renew_row(*self._key, self._token):
                    logger.error(
                        "the build lock of %s was taken over by another process (no heartbeat "
                        "got through for %.0f s): two builds may now run",
                        self._key[0],
                        LOCK_STALE_S,
                    )
                    return
            except BlissError as error:
                logger.warning(
                    "cannot renew the build lock of %s (%s); retrying", self._key[0], error
                )

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self._store._drop_row(*self._key, self._token)


class _AdvisoryLock(HeldBuildLock):
    """PostgreSQL: an advisory lock on a connection of its own."""

    def __init__(
        self,
        store: BuildLocks,
        name: str,
        fingerprint: str,
        token: str,
        connection: Connection,
        key: int,
    ) -> None:
        self._store, self._name, self._fingerprint, self._token = store, name, fingerprint, token
        self._connection, self._key = connection, key

    def release(self) -> None:
        try:
            self._store._drop_row(self._name, self._fingerprint, self._token)
            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        except (BlissError, OperationalError):
            # A lost connection took the lock with it; never pool one that may still hold it.
            self._connection.invalidate()
        finally:
            self._connection.close()


_HOST = socket.gethostname()[:200]


def _advisory_key(name: str, fingerprint: str) -> int:
    """A signed 64-bit key (pg_try_advisory_lock(bigint)) for the build."""
    digest = hashlib.sha256(f"bliss build\0{name}\0{fingerprint}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _abandoned(holder: BuildLockRecord, now: datetime) -> bool:
    if holder.host == _HOST and not _process_exists(holder.pid):
        return True
    return (now - holder.heartbeat_at).total_seconds() > LOCK_STALE_S


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(name: str, holder: BuildLockRecord | None) -> str:
    if holder is None:
        return f"another build of {name} with the same inputs and options is running"
    return (
        f"another build of {name} with the same inputs and options is running (pid "
        f"{holder.pid} on {holder.host}, since {holder.acquired_at:%Y-%m-%d %H:%M:%S} UTC)"
    )
