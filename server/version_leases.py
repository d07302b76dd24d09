"""The leases this server holds on the versions it serves (see ``bliss.store.leases``).

The registry leases a version before loading it (a version deleted meanwhile is then not
loaded), holds the lease while the version serves or still finishes calls, and lets go
when it releases the version. Every poll interval all leases are renewed in one store
write, valid for :data:`MISSED_RENEWALS` intervals (at least :data:`MIN_LEASE_TTL_S`):
a server that stops renewing (killed, cut off from the store) stops protecting its
versions once they expire. A graceful shutdown releases them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from bliss.errors import NotFoundError
from bliss.store.leases import LeaseHolder

if TYPE_CHECKING:
    from bliss.store import Store, VersionRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")

MISSED_RENEWALS = 3
# A floor, so that a short poll interval on a busy machine does not let leases lapse.
MIN_LEASE_TTL_S = 30.0


class ServerLeases:
    """This server's leases: every version it loads, serves or still finishes calls on."""

    def __init__(self, store: Store, poll_interval_s: float) -> None:
        self._store = store
        self._holder = LeaseHolder.this_process()
        self._interval_s = poll_interval_s
        self.ttl_s = max(MIN_LEASE_TTL_S, MISSED_RENEWALS * poll_interval_s)
        self._held: Counter[int] = Counter()  # version id -> loads and served copies
        self._writing = asyncio.Lock()  # one store write at a time, each of the latest set
        self._pending: set[asyncio.Task] = set()

    async def load_leased(self, version: VersionRecord, load: Callable[[], Awaitable[T]]) -> T:
        """``await load()`` with ``version`` leased first; the lease stays unless it fails.

        NotFoundError when the version was deleted before the lease was taken.
        """
        self._held[version.id] += 1
        try:
            if version.id not in await self._sync():
                raise NotFoundError(f"{version.label} was deleted before this server loaded it")
            return await load()
        except BaseException:
            self.release(version.id)
            raise

    def release(self, version_id: int) -> None:
        """Let go of one hold on the version; the store hears of it in the background."""
        if version_id not in self._held:
            return  # a call that ended after the shutdown released everything
        self._held[version_id] -= 1
        if self._held[version_id] > 0:
            return
        del self._held[version_id]
        task = asyncio.get_running_loop().create_task(self._sync_logging_failures())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._sync_logging_failures()

    async def release_all(self) -> None:
        """Graceful shutdown: no version of this server is protected any more."""
        self._held.clear()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._sync_logging_failures()

    async def _sync(self) -> set[int]:
        async with self._writing:
            return await asyncio.to_thread(
                self._store.sync_leases, self._holder, set(self._held), self.ttl_s
            )

    async def _sync_logging_failures(self) -> None:
        try:
            await self._sync()
        except Exception as error:
            # Scoring goes on; the leases are written again at the next renewal.
            logger.warning("cannot write this server's version leases to the store (%s)", error)
