"""The periodic health check: is the store usable, are the served files still the loaded ones?

Every ``--health-check-interval-s`` the monitor pings the store and compares each served
version's files (FAISS file, artifacts manifest and artifacts) with the device, inode,
size and mtime they had when the version was loaded: a few ``stat`` calls, no hashing.

- **Files.** A version whose files went missing, were truncated, replaced or modified is
  NOT_SERVING and its scoring calls get UNAVAILABLE, although its memory mappings might
  still answer: a restart would fail to load it (missing) or load other bytes (changed),
  and reading a mapping past the end of a truncated file kills the process (SIGBUS), so
  the server stops touching it. Files that come back as they were (renamed back) make it
  SERVING at the next check; files that come back different (copied back, rewritten) are
  verified in full against the store's checksums, once per change, and the version is
  reloaded from them.
- **Store.** A SQLite file is stat-ed (missing, replaced) and read through a fresh
  read-only connection with a short busy timeout, which a corrupt or locked file fails.
  Never through the server's pool: its open connections keep reading a deleted file, and a
  new one would create an empty file in its place. Other databases must answer a query on
  the pool within :data:`STORE_PING_TIMEOUT_S`. While the store is unusable every index is
  NOT_SERVING and scoring gets UNAVAILABLE (the server cannot see activations or
  rollbacks, its version leases lapse, and a restart would fail). When the store answers
  again, the pool is reconnected, which drops connections to a deleted or replaced file.

Each change of state is logged once, with the paths and the database's error; clients get
a one-line reason without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from bliss.errors import BlissError, NotFoundError, StoreError
from bliss.server.status_codes import store_failure
from bliss.serving_artifacts import MANIFEST, artifacts_directory, read_manifest
from bliss.store.database import normalize_url, redact_url
from bliss.version_check import verify_version

if TYPE_CHECKING:
    from bliss.server.index_registry import IndexRegistry, ServedIndex
    from bliss.server.settings import ServerSettings
    from bliss.store import Store, VersionRecord

logger = logging.getLogger(__name__)

# A store that takes longer than this to answer a trivial query is down for our callers.
STORE_PING_TIMEOUT_S = 3.0
# Well inside the ping timeout, so that a locked SQLite file is reported as locked.
SQLITE_BUSY_TIMEOUT_S = 1.0
_NAMED_PROBLEMS = 3


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class FileState:
    """What ``stat`` says of a served file; equal states mean the same bytes were not
    replaced, resized or rewritten (mtime) since."""

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int


def served_file_states(version: VersionRecord, data_dir: Path) -> tuple[FileState, ...]:
    """The states of the files ``version`` is loaded from (none for a Milvus dictionary);
    NotFoundError when one is missing."""
    if version.dictionary_store == "milvus":
        return ()
    faiss_file = data_dir / version.faiss_path
    paths = [faiss_file]
    if version.artifacts_checksum is not None:
        directory = artifacts_directory(faiss_file)
        manifest = read_manifest(directory, faiss_file, version.artifacts_checksum)
        paths = [directory / MANIFEST, *(path for path, _ in manifest.paths(directory, faiss_file))]
    states = []
    for path in dict.fromkeys(paths):
        state = _stat(path)
        if isinstance(state, str):
            raise NotFoundError(f"{path} {state}: restore it or rebuild the version")
        states.append(state)
    return tuple(states)


@dataclass(frozen=True)
class FileProblem:
    detail: str  # for the log: names the paths
    missing: bool  # a file is gone or unreadable: nothing to reload until it is back
    seen: tuple[FileState | str, ...]  # the files now: reload once per distinct change


def compare_files(loaded: tuple[FileState, ...]) -> FileProblem | None:
    """How the files differ from their states at load time; None when they do not."""
    now = tuple(_stat(state.path) for state in loaded)
    details = [
        problem
        for before, after in zip(loaded, now, strict=True)
        if (problem := _difference(before, after)) is not None
    ]
    if not details:
        return None
    more = len(details) - _NAMED_PROBLEMS
    detail = "; ".join(details[:_NAMED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    return FileProblem(detail, any(isinstance(state, str) for state in now), now)


def _stat(path: Path) -> FileState | str:
    """The file's state, or why it has none (``is missing``, ``cannot be read: ...``)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "is missing"
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    return FileState(path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _difference(before: FileState, after: FileState | str) -> str | None:
    if isinstance(after, str):
        return f"{before.path} {after}"
    if (after.device, after.inode) != (before.device, before.inode):
        return f"{before.path} was replaced by another file"
    if after.size != before.size:
        return (
            f"{before.path} has {after.size:,} bytes, {before.size:,} when it was loaded "
            "(truncated or rewritten)"
        )
    if after.mtime_ns != before.mtime_ns:
        return f"{before.path} was modified after it was loaded"
    return None


# --------------------------------------------------------------------------- store


class StoreProbe(Protocol):
    def check(self) -> str | None:
        """Why the store is unusable now (for the log), or None; runs on a thread."""


class SqliteProbe:
    """The SQLite file at its path: there, the same file, and readable within a second."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._identity = _identity(path)

    def check(self) -> str | None:
        try:
            stat = self._path.stat()
        except OSError as error:
            return f"the SQLite store {self._path} is gone ({error.strerror})"
        try:
            uri = f"{self._path.as_uri()}?mode=ro"
            with contextlib.closing(
                sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
            ) as connection:
                connection.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.Error as error:
            return f"the SQLite store {self._path} is unusable: {error}"
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity:
            # Another usable file (a restored backup): reported once, so that the pool is
            # reconnected to it when the store turns healthy at the next check.
            self._identity = identity
            return f"the SQLite store {self._path} was replaced by another file"
        return None


class QueryProbe:
    """Any other database: a small query on the store's own pool."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def check(self) -> str | None:
        try:
            self._store.active_versions()
        except BlissError as error:
            return str(error)
        except SQLAlchemyError as error:
            return str(store_failure(error, self._store.url))
        return None


def store_probe(store: Store, store_url: str) -> StoreProbe:
    url = make_url(normalize_url(store_url))
    database = url.database or ""
    # In-memory and URI-style SQLite databases have no plain file to stat.
    on_disk = database not in ("", ":memory:") and not database.startswith("file:")
    if url.get_backend_name() == "sqlite" and on_disk:
        return SqliteProbe(Path(database).resolve())
    return QueryProbe(store)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


# --------------------------------------------------------------------------- monitor


class HealthMonitor:
    """Runs the checks above and tells the registry; see the module docstring."""

    def __init__(self, registry: IndexRegistry, store: Store, settings: ServerSettings) -> None:
        self._registry = registry
        self._store = store
        self._settings = settings
        self._probe = store_probe(store, settings.resolved_store_url)
        self._store_url = redact_url(settings.resolved_store_url)
        self._ping: asyncio.Future[str | None] | None = None
        self._reloads: dict[str, asyncio.Task[None]] = {}
        self._tried: dict[int, tuple[FileState | str, ...]] = {}  # version id -> files seen

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.health_check_interval_s)
            await self.check()

    async def check(self) -> None:
        await self._check_store()
        await self._check_files(self._registry.served_indexes())
        await self._registry.publish_health()

    async def close(self) -> None:
        for task in self._reloads.values():
            task.cancel()
        await asyncio.gather(*self._reloads.values(), return_exceptions=True)

    async def _check_store(self) -> None:
        # One ping at a time: a hung database must not pile up threads, one per check.
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(asyncio.to_thread(self._probe.check))
        done, _ = await asyncio.wait({self._ping}, timeout=STORE_PING_TIMEOUT_S)
        if done:
            problem = self._ping.result()
        else:
            problem = (
                f"the store at {self._store_url} did not answer within {STORE_PING_TIMEOUT_S:g} s"
            )
        previous = self._registry.store_problem
        self._registry.store_problem = problem
        if problem is not None and previous is None:
            logger.error(
                "health: NOT_SERVING, %s; every index is NOT_SERVING and scoring calls get "
                "UNAVAILABLE until the store answers again",
                problem,
            )
        elif problem is None and previous is not None:
            # Drop pooled connections: they may point at a deleted or replaced file, or at
            # a database server that went away.
            await asyncio.to_thread(self._store.close)
            logger.warning("health: the store answers again; SERVING")

    async def _check_files(self, served: list[ServedIndex]) -> None:
        problems = await asyncio.to_thread(_compare_all, served)
        for index, problem in zip(served, problems, strict=True):
            detail = None if problem is None else problem.detail
            in_milvus = index.version.dictionary_store == "milvus"
            if detail is not None and index.problem is None:
                logger.error(
                    "health: %s is NOT_SERVING, %s: %s; its scoring calls get UNAVAILABLE until %s",
                    index.label,
                    "its dictionary store fails"
                    if in_milvus
                    else "its files changed since it was loaded",
                    detail,
                    "Milvus answers again" if in_milvus else "they are restored",
                )
            elif detail is None and index.problem is not None:
                logger.warning(
                    "health: %s; SERVING",
                    f"the Milvus collection of {index.label} answers again"
                    if in_milvus
                    else f"the files of {index.label} are back as loaded",
                )
            index.problem = detail
            if problem is not None and not problem.missing:
                self._reload_once(index, problem.seen)

    def _reload_once(self, served: ServedIndex, seen: tuple[FileState | str, ...]) -> None:
        """Verify changed files in full and load the version from them, once per change
        (verifying reads every byte: not at every check while they stay broken)."""
        version = served.version
        running = self._reloads.get(version.name)
        if (running is not None and not running.done()) or self._registry.store_problem:
            return
        if self._tried.get(version.id) == seen:
            return
        self._tried[version.id] = seen
        task = asyncio.get_running_loop().create_task(self._verify_and_reload(served))
        self._reloads[version.name] = task

    async def _verify_and_reload(self, served: ServedIndex) -> None:
        version = served.version
        try:
            await asyncio.to_thread(verify_version, self._store, version, self._settings.data_dir)
        except (StoreError, SQLAlchemyError) as error:
            if isinstance(error, SQLAlchemyError):
                error = store_failure(error, self._store_url)
            # Not the files' fault: verify them again at the next check.
            self._tried.pop(version.id, None)
            logger.warning("health: cannot verify %s now: %s", version.label, error)
            return
        except (BlissError, OSError) as error:
            logger.warning(
                "health: the changed files of %s do not verify (%s); it stays NOT_SERVING: "
                "restore them or activate another version",
                version.label,
                error,
            )
            return
        logger.info("health: the changed files of %s verify; loading it from them", version.label)
        if await self._registry.reload(served):
            self._tried.pop(version.id, None)
            await self._registry.publish_health()


def _compare_all(served: Iterable[ServedIndex]) -> list[FileProblem | None]:
    return [
        _dictionary_problem(index) if index.version.dictionary_store == "milvus"
        else compare_files(index.files)
        for index in served
    ]  # fmt: skip


def _dictionary_problem(served: ServedIndex) -> FileProblem | None:
    """A dictionary held in Milvus: the collection must answer (no local files to stat).
    Nothing to reload when it is back: the same collection answers again."""
    check = getattr(served.scorer.index, "check", None)
    try:
        if check is not None:
            check()
    # Any failure of the probe means the collection cannot be searched now; it must not
    # end the health checks.
    except Exception as error:
        return FileProblem(f"its Milvus collection cannot be searched ({error})", True, ())
    return None
