"""Removing what versions and builds leave behind: deleted versions' files, and ``bliss index gc``.

Files and folders are removed in two steps: renamed into ``<data_dir>/.trash/`` (atomic,
on the same file system), then deleted there. A removal killed half-way leaves its rest
in the trash, and every gc run empties it first. What a process killed before the rename
left in place (a deleted version's files, a workspace) is found by gc's scan:

- versions stuck in ``building`` for longer than the threshold whose build lock is free
  (no build is running them): their rows, files and workspace;
- workspaces ``builds/<name>/<fingerprint>/`` untouched for longer than the threshold
  whose build lock is free;
- files under ``indexes/<name>/`` of versions the store does not have (``v<N>.faiss``,
  ``v<N>.artifacts/``), and temporary files of writes killed before their rename, once
  older than the threshold;
- leases of servers that stopped renewing them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bliss.errors import BlissError, InvalidInputError
from bliss.indexer.workspace import BuildWorkspace
from bliss.serving_artifacts import artifacts_directory
from bliss.store import Store, VersionRecord, VersionState

logger = logging.getLogger(__name__)

TRASH = ".trash"
INDEXES = "indexes"  # where the build writes indexes/<name>/v<N>.faiss (BuildRun._write_faiss)
BUILDS = "builds"  # BuildWorkspace.for_build: builds/<name>/<fingerprint prefix>/
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.(faiss|artifacts)")
_TEMPORARY = re.compile(r"\..+\.tmp(-[0-9]+)?")  # write-then-rename leftovers
_NEVER = datetime.min.replace(tzinfo=timezone.utc)


def drop_dictionary(version: VersionRecord) -> None:
    """Drop a deleted version's Milvus collection; a Milvus that does not answer leaves it,
    with one warning saying which (no store row refers to it any more)."""
    if version.dictionary_store != "milvus" or version.dictionary_options is None:
        return
    from bliss.milvus_dictionary import MilvusDictionaryOptions, drop_collection

    try:
        drop_collection(version.dictionary_options)
    except BlissError as error:
        collection = MilvusDictionaryOptions.from_json(version.dictionary_options).collection
        logger.warning(
            "%s is deleted, but its Milvus collection %s could not be dropped (%s): drop it "
            "with pymilvus when Milvus answers",
            version.label, collection, error,
        )  # fmt: skip


def discard(data_dir: Path, paths: Sequence[Path]) -> None:
    """Remove files and folders (missing ones are fine), through the trash."""
    present = [path for path in paths if path.exists() or path.is_symlink()]
    if not present:
        return
    bin_ = data_dir / TRASH / secrets.token_hex(8)
    for number, path in enumerate(present):
        # Made again each time: a gc emptying the trash meanwhile may have removed it.
        bin_.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, bin_ / f"{number}-{path.name}")
        except OSError as error:
            if error.errno != errno.EXDEV:  # a folder mounted from elsewhere: in place
                raise
            _delete(path)
    _delete(bin_)
    with contextlib.suppress(OSError):  # not empty: another removal is under way
        bin_.parent.rmdir()


def version_paths(data_dir: Path, version: VersionRecord) -> list[Path]:
    """The version's FAISS file and serving artifacts (where a build writes them, when
    it has not recorded them yet)."""
    relative = version.faiss_path or f"{INDEXES}/{version.name}/v{version.version}.faiss"
    faiss_file = data_dir / relative
    return [faiss_file, artifacts_directory(faiss_file)]


def remove_workspace(data_dir: Path, workspace: BuildWorkspace) -> None:
    """A finished build's workspace, through the trash."""
    discard(data_dir, [workspace.root])
    workspace.remove()  # the now empty folders above it


@dataclass
class GarbageReport:
    """What a gc run removed (or, dry, would remove): one line per item."""

    dry_run: bool
    lines: list[str] = field(default_factory=list)
    items: int = 0
    bytes: int = 0
    seen: set[Path] = field(default_factory=set)  # counted already (a dry run keeps them)

    def measure(self, paths: Sequence[Path]) -> int:
        self.seen.update(paths)
        return sum(map(_size, paths))

    def note(self, what: str, size: int) -> None:
        verb = "would remove" if self.dry_run else "removed"
        self.lines.append(f"{verb} {what} ({size / 2**20:,.1f} MiB)")
        self.items += 1
        self.bytes += size


def collect_garbage(
    store: Store, data_dir: Path, older_than: timedelta, *, dry_run: bool
) -> GarbageReport:
    """One gc pass over the data directory and the store (see the module docstring)."""
    collected = GarbageReport(dry_run)
    cutoff = datetime.now(timezone.utc) - older_than
    _empty_trash(data_dir, collected)
    if not dry_run:
        expired = store.prune_expired_leases()
        if expired:
            collected.lines.append(f"removed {expired} expired leases of servers that stopped")
    _stuck_builds(store, data_dir, cutoff, collected)
    _orphaned_workspaces(store, data_dir, cutoff, collected)
    _unreferenced_files(store, data_dir, cutoff, collected)
    return collected


def _empty_trash(data_dir: Path, collected: GarbageReport) -> None:
    trash = data_dir / TRASH
    for leftover in sorted(trash.iterdir()) if trash.is_dir() else ():
        size = _size(leftover)
        if not collected.dry_run:
            _delete(leftover)
        collected.note(f"the rest of an interrupted removal, {_shown(data_dir, leftover)}", size)
    if not collected.dry_run:
        with contextlib.suppress(OSError):  # absent, or a removal is under way
            trash.rmdir()


def _stuck_builds(store: Store, data_dir: Path, cutoff: datetime, collected: GarbageReport) -> None:
    for version in store.list_versions():
        if version.state is not VersionState.BUILDING:
            continue
        workspace = BuildWorkspace.for_build(data_dir, version.name, version.build_fingerprint)
        last_change = max(version.created_at, _last_change(workspace.root))
        if last_change > cutoff:
            continue
        with _free_build_lock(store, version.name, version.build_fingerprint) as free:
            if not free:
                collected.lines.append(f"kept {version.label}: its build is running")
                continue
            paths = [*version_paths(data_dir, version), workspace.root]
            size = collected.measure(paths)
            if not collected.dry_run:
                store.delete_version(version.id)
                discard(data_dir, paths)
                drop_dictionary(version)
                workspace.remove()
            collected.note(
                f"{version.label}, building since {version.created_at:%Y-%m-%d %H:%M} UTC and "
                f"untouched for {_age(last_change)}, with its files and workspace",
                size,
            )


def _orphaned_workspaces(
    store: Store, data_dir: Path, cutoff: datetime, collected: GarbageReport
) -> None:
    for root in sorted((data_dir / BUILDS).glob("*/*")):
        if not root.is_dir() or root in collected.seen or _last_change(root) > cutoff:
            continue
        fingerprint = _workspace_build(root)
        name = root.parent.name
        # A workspace without its identity file was never trusted by a build: no lock.
        lock = _free_build_lock(store, name, fingerprint) if fingerprint else _always_free()
        with lock as free:
            if not free:
                continue
            size = collected.measure([root])
            if not collected.dry_run:
                discard(data_dir, [root])
                BuildWorkspace(root).remove()
            collected.note(
                f"workspace {_shown(data_dir, root)} (untouched for {_age(_last_change(root))})",
                size,
            )
    if not collected.dry_run:
        _remove_empty_folders(data_dir / BUILDS)  # e.g. left by a killed workspace removal


def _unreferenced_files(
    store: Store, data_dir: Path, cutoff: datetime, collected: GarbageReport
) -> None:
    # Listed before the store is read: a build creates its version before its files, so
    # every file listed of a live build has its version in what is read next.
    listed = sorted((data_dir / INDEXES).glob("*/*"))
    versions = {(version.name, version.version) for version in store.list_versions()}
    for path in listed:
        name = path.parent.name
        match = _VERSION_FILE.fullmatch(path.name)
        if path in collected.seen:
            continue
        if match is not None:
            if (name, int(match[1])) in versions:
                continue
            what = f"{_shown(data_dir, path)} (the store has no version {name}@{match[1]})"
        elif _TEMPORARY.fullmatch(path.name) and _last_change(path) <= cutoff:
            what = f"{_shown(data_dir, path)} (left by a write that did not finish)"
        else:
            continue
        size = _size(path)
        if not collected.dry_run:
            discard(data_dir, [path])
        collected.note(what, size)
    if not collected.dry_run:
        _remove_empty_folders(data_dir / INDEXES)


def _remove_empty_folders(root: Path) -> None:
    """Empty ``root/<name>`` folders, and ``root`` itself once empty."""
    for folder in [*root.glob("*"), root]:
        with contextlib.suppress(OSError):  # not empty, not a folder, or gone
            folder.rmdir()


@contextmanager
def _free_build_lock(store: Store, name: str, fingerprint: str) -> Iterator[bool]:
    """Hold the build's lock for the block when no build holds it (yields whether)."""
    lock = store.try_build_lock(name, fingerprint)
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def _always_free() -> Iterator[bool]:
    yield True


def _workspace_build(root: Path) -> str | None:
    try:
        build = json.loads((root / "workspace.json").read_text("utf-8"))["build"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return build if isinstance(build, str) else None


def _last_change(path: Path) -> datetime:
    """The newest modification time of ``path`` and everything under it."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return _NEVER
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            for entry in [folder, *(os.path.join(folder, name) for name in files)]:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    newest = max(newest, os.lstat(entry).st_mtime)
    return datetime.fromtimestamp(newest, timezone.utc)


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        files = [Path(folder, name) for folder, _, names in os.walk(path) for name in names]
    else:
        files = [path]
    total = 0
    for file in files:
        with contextlib.suppress(FileNotFoundError):  # absent, or removed meanwhile
            total += file.lstat().st_size
    return total


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists():
        raise InvalidInputError(f"cannot remove {path}: check its permissions, then run this again")


def _shown(data_dir: Path, path: Path) -> str:
    return str(path.relative_to(data_dir))


def _age(since: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - since).total_seconds()
    for unit, length in (("days", 86_400), ("hours", 3_600), ("minutes", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} seconds"
