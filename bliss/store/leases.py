"""Version leases: which running servers serve which versions, so none is deleted under one.

A server holds a lease on every version it serves, is loading, or still finishes calls
on, and renews them together every poll interval (:meth:`VersionLeases.sync_leases`).
A lease not renewed by its ``expires_at`` belongs to a server that crashed or lost the
store, and counts for nothing. Taking a lease and deleting a version both lock the
version's row, so they never interleave: either the delete sees the lease and refuses,
or the server finds the version gone and does not load it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from bliss.errors import BlissError
from bliss.store.models import IndexVersion, VersionLease
from bliss.store.records import LeaseRecord, lease_record
from bliss.store.sessions import StoreSessions, utc_now


class VersionInUseError(BlissError):
    """The version is leased by running servers; deleting it would pull it from under them."""


@dataclass(frozen=True)
class LeaseHolder:
    """A process that takes leases: a random id per server run, and where it runs."""

    server_id: str
    host: str
    pid: int

    @classmethod
    def this_process(cls) -> LeaseHolder:
        return cls(uuid.uuid4().hex, socket.gethostname()[:200], os.getpid())


class VersionLeases(StoreSessions):
    """The lease queries of :class:`bliss.store.Store`."""

    def sync_leases(
        self, holder: LeaseHolder, version_ids: Collection[int], ttl_s: float
    ) -> set[int]:
        """Make ``holder``'s leases exactly ``version_ids``, each valid for ``ttl_s`` more.

        Returns the ids leased: those of ``version_ids`` that still exist (a version
        deleted meanwhile is not leased, and must not be loaded). Leases of the holder
        on other versions are released.
        """
        now = utc_now()
        expires = now + timedelta(seconds=ttl_s)
        with self._writing() as session:
            # FOR KEY SHARE, in id order like activation's FOR UPDATE: a delete of one of
            # these versions waits for this transaction, and nothing deadlocks.
            existing = set(
                session.scalars(
                    select(IndexVersion.id)
                    .where(IndexVersion.id.in_(set(version_ids)))
                    .order_by(IndexVersion.id)
                    .with_for_update(read=True, key_share=True)
                )
            )
            held = {
                row.version_id: row
                for row in session.scalars(
                    select(VersionLease).where(VersionLease.server_id == holder.server_id)
                )
            }
            for version_id, row in held.items():
                if version_id not in existing:
                    session.delete(row)
            for version_id in existing - set(held):
                session.add(
                    VersionLease(
                        version_id=version_id,
                        server_id=holder.server_id,
                        host=holder.host,
                        pid=holder.pid,
                        acquired_at=now,
                        renewed_at=now,
                        expires_at=expires,
                    )
                )
            for version_id in existing & set(held):
                held[version_id].renewed_at = now
                held[version_id].expires_at = expires
        return existing

    def live_leases(self, version_id: int) -> list[LeaseRecord]:
        """The unexpired leases on a version, oldest first."""
        with self._reading() as session:
            return live_leases_of(session, version_id)

    def prune_expired_leases(self) -> int:
        """Delete the leases of servers that stopped renewing them; returns how many."""
        now = utc_now()
        with self._writing() as session:
            expired = [
                (row.version_id, row.server_id)
                for row in map(lease_record, session.scalars(select(VersionLease)))
                if row.expires_at <= now
            ]
            for version_id, server_id in expired:
                session.execute(
                    delete(VersionLease).where(
                        VersionLease.version_id == version_id, VersionLease.server_id == server_id
                    )
                )
        return len(expired)


def version_in_use(row: IndexVersion, leases: Sequence[LeaseRecord]) -> VersionInUseError:
    """The one-line refusal to delete ``row`` while ``leases`` (live, oldest first) hold it."""
    servers = len({lease.server_id for lease in leases})
    since = leases[0].acquired_at
    until = max(lease.expires_at for lease in leases)
    return VersionInUseError(
        f"{row.name}@{row.version} is served by {servers} running "
        f"server{'s' if servers > 1 else ''} (since {since:%Y-%m-%d %H:%M:%S} UTC): a server "
        "lets go of a version once it has swapped to the active one and its calls have "
        "finished (within a poll interval or two), and a server that died stops holding it at "
        f"{until:%H:%M:%S} UTC at the latest; run this again then, or add --force to delete "
        "it now (calls still on it may fail)"
    )


def live_leases_of(session: Session, version_id: int) -> list[LeaseRecord]:
    """The version's unexpired leases, oldest first."""
    now = utc_now()
    rows = session.scalars(select(VersionLease).where(VersionLease.version_id == version_id))
    # Compared here, not in SQL: SQLite keeps datetimes as text.
    live = [lease for lease in map(lease_record, rows) if lease.expires_at > now]
    return sorted(live, key=lambda lease: lease.acquired_at)
