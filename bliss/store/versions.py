"""Index versions: their creation, lookup, build records and lifecycle.

A version is ``building`` (rows and FAISS file are written) -> ``ready`` (complete,
immutable) -> ``active`` (served; one per name) -> ``retired`` (replaced; can be activated
again). Only building versions accept writes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bliss.errors import InvalidInputError, NotFoundError, StoreError
from bliss.recall_tuning import SearchTuning
from bliss.store.leases import live_leases_of, version_in_use
from bliss.store.models import DictionaryEntry, EntryStatistic, IndexVersion, NormalClass
from bliss.store.records import (
    LeaseRecord,
    StatisticsMode,
    VersionRecord,
    VersionState,
    version_record,
)
from bliss.store.rows import (
    SHORT_TEXT,
    building_row,
    check_relative_path,
    check_sha256,
    check_short,
    quote_positions,
    version_label,
    version_row,
)
from bliss.store.sessions import StoreSessions, utc_now

_CREATE_ATTEMPTS = 5  # backstop: creators that still collide retry
_CREATE_LOCK_SPACE = 0x626C6973  # PostgreSQL advisory lock space of create_version


class VersionLifecycle(StoreSessions):
    """The version queries and state changes of :class:`bliss.store.Store`."""

    def create_version(
        self,
        *,
        name: str,
        model_name: str,
        model_weights: str,
        model_checksum: str | None,
        embedding_dim: int,
        prompt_template: str,
        dictionary_source: str,
        dictionary_size: int,
        faiss_path: str,
        faiss_kind: str,
        default_k: int,
        default_lambda: float,
        eps: float,
        build_fingerprint: str,
        statistics_mode: StatisticsMode = StatisticsMode.TABLE,
        parent_version_id: int | None = None,
    ) -> VersionRecord:
        """A new ``building`` version of ``name``, numbered one past its newest version.

        ``parent_version_id`` names the version this one extends (``bliss index extend``).
        """
        _check_index_name(name)
        check_sha256("model checksum", model_checksum, optional=True)
        if faiss_path:
            check_relative_path(faiss_path)
        for label, value in (
            ("embedding_dim", embedding_dim),
            ("dictionary_size", dictionary_size),
            ("default_k", default_k),
        ):
            if value < 1:
                raise InvalidInputError(f"{label} must be at least 1, got {value}")
        if not math.isfinite(default_lambda):
            raise InvalidInputError(f"default_lambda must be finite, got {default_lambda}")
        if not (math.isfinite(eps) and eps >= 0):
            raise InvalidInputError(f"eps must be finite and >= 0, got {eps}")
        if not 1 <= len(build_fingerprint) <= 64:
            raise InvalidInputError("build_fingerprint must be 1 to 64 characters (a hex digest)")
        check_short("model_name", model_name)
        check_short("faiss_kind", faiss_kind)
        fields = dict(
            name=name, state=VersionState.BUILDING.value, model_name=model_name,
            model_weights=model_weights, model_checksum=model_checksum,
            embedding_dim=embedding_dim, prompt_template=prompt_template,
            dictionary_source=dictionary_source, dictionary_size=dictionary_size,
            faiss_path=faiss_path, faiss_kind=faiss_kind, faiss_checksum=None,
            default_k=default_k, default_lambda=float(default_lambda), eps=float(eps),
            build_fingerprint=build_fingerprint,
            statistics_mode=StatisticsMode(statistics_mode).value,
            parent_version_id=parent_version_id,
        )  # fmt: skip
        attempts_left = _CREATE_ATTEMPTS
        while True:
            try:
                return self._insert_next_version(fields)
            except IntegrityError as error:
                # Another writer took the same number (PostgreSQL); the next try sees it.
                attempts_left -= 1
                if not attempts_left:
                    raise StoreError(
                        f"could not number a new version of index {name!r}: "
                        f"{_CREATE_ATTEMPTS} concurrent creations collided; try again"
                    ) from error

    def _insert_next_version(self, fields: Mapping[str, object]) -> VersionRecord:
        with self._writing() as session:
            if session.get_bind().dialect.name == "postgresql":
                # Creators of one name queue here instead of colliding on the unique
                # constraint (SQLite's BEGIN IMMEDIATE already serialises writers).
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:space, :key)"),
                    {"space": _CREATE_LOCK_SPACE, "key": _lock_key(str(fields["name"]))},
                )
            newest = session.scalar(
                select(func.max(IndexVersion.version)).where(IndexVersion.name == fields["name"])
            )
            row = IndexVersion(**fields, version=(newest or 0) + 1, created_at=utc_now())
            session.add(row)
            session.flush()
            return version_record(row)

    def find_version_by_fingerprint(self, name: str, fingerprint: str) -> VersionRecord | None:
        """The newest version of ``name`` built with ``fingerprint``, in any state."""
        with self._reading() as session:
            row = session.scalars(
                select(IndexVersion)
                .where(IndexVersion.name == name, IndexVersion.build_fingerprint == fingerprint)
                .order_by(IndexVersion.version.desc())
                .limit(1)
            ).first()
            return None if row is None else version_record(row)

    def get_version(self, name: str, version: int | None = None) -> VersionRecord:
        """Version ``version`` of ``name``; None means the active one."""
        with self._reading() as session:
            query = select(IndexVersion).where(IndexVersion.name == name)
            if version is None:
                query = query.where(IndexVersion.state == VersionState.ACTIVE.value)
            else:
                query = query.where(IndexVersion.version == version)
            row = session.scalars(query).first()
            if row is None:
                raise NotFoundError(_describe_missing_version(session, name, version))
            return version_record(row)

    def get_version_by_id(self, version_id: int) -> VersionRecord:
        """The version with database id ``version_id``."""
        with self._reading() as session:
            return version_record(version_row(session, version_id))

    def list_versions(self, name: str | None = None) -> list[VersionRecord]:
        """All versions (of ``name`` when given), ordered by name and version."""
        query = select(IndexVersion).order_by(IndexVersion.name, IndexVersion.version)
        if name is not None:
            query = query.where(IndexVersion.name == name)
        with self._reading() as session:
            return [version_record(row) for row in session.scalars(query)]

    def active_versions(self) -> list[VersionRecord]:
        """The active version of every index name, ordered by name."""
        query = (
            select(IndexVersion)
            .where(IndexVersion.state == VersionState.ACTIVE.value)
            .order_by(IndexVersion.name)
        )
        with self._reading() as session:
            return [version_record(row) for row in session.scalars(query)]

    def set_faiss_file(self, version_id: int, *, path: str, kind: str, checksum: str) -> None:
        """Record the version's FAISS file (relative to the data dir), kind and sha256."""
        check_relative_path(path)
        check_short("faiss kind", kind)
        check_sha256("FAISS checksum", checksum, optional=False)
        with self._writing() as session:
            row = building_row(session, version_id, "recording the FAISS file")
            row.faiss_path, row.faiss_kind, row.faiss_checksum = path, kind, checksum

    def set_artifacts(self, version_id: int, checksum: str) -> None:
        """Record the sha256 of the version's serving-artifacts manifest."""
        check_sha256("artifacts checksum", checksum, optional=False)
        with self._writing() as session:
            row = building_row(session, version_id, "recording the serving artifacts")
            row.artifacts_checksum = checksum

    def set_dictionary_store(self, version_id: int, store: str, options: str) -> None:
        """Record that the version's dictionary is searched in ``store`` (``milvus``),
        with ``options`` (JSON) saying where and how."""
        if store != "milvus":
            raise InvalidInputError(f"unknown dictionary store {store!r}: expected milvus")
        with self._writing() as session:
            row = building_row(session, version_id, "recording the dictionary store")
            row.dictionary_store, row.dictionary_options = store, options

    def set_search_tuning(self, version_id: int, tuning: SearchTuning) -> None:
        """Record the recall-tuned search parameter and what it measured."""
        check_short("search parameter", tuning.parameter)
        for what, value in (("target recall", tuning.target), ("recall", tuning.recall)):
            if not 0.0 <= value <= 1.0:
                raise InvalidInputError(f"{what} must be in [0, 1], got {value}")
        change = tuning.max_score_change
        if change is not None and not (math.isfinite(change) and change >= 0):
            raise InvalidInputError(f"max score change must be finite and >= 0, got {change}")
        with self._writing() as session:
            row = building_row(session, version_id, "recording the search tuning")
            row.search_parameter, row.search_value = tuning.parameter, int(tuning.value)
            row.target_recall, row.measured_recall = tuning.target, tuning.recall
            row.max_score_change = change

    def mark_ready(self, version_id: int) -> VersionRecord:
        """building -> ready, once classes, entries, statistics and FAISS file are written.

        A version that is already ready is returned unchanged (the indexer may resume).
        """
        with self._writing() as session:
            row = version_row(session, version_id, lock=True)
            if row.state == VersionState.READY.value:
                return version_record(row)
            if row.state != VersionState.BUILDING.value:
                raise InvalidInputError(
                    f"index {version_label(row)} is {row.state}: only building versions can be "
                    "marked ready"
                )
            problems = _completeness_problems(session, row)
            if problems:
                raise StoreError(
                    f"index {version_label(row)} is incomplete, so it cannot be marked ready: "
                    + "; ".join(problems)
                    + ". Finish the build (rerun the indexer; its stages resume)."
                )
            row.state = VersionState.READY.value
            row.ready_at = utc_now()
            if session.get_bind().dialect.name == "postgresql":
                # Bulk loads leave the planner's estimates stale; with them it scans the
                # whole version instead of the primary key for a gather (measured 8x).
                session.execute(text("ANALYZE entry_statistics, dictionary_entries"))
            return version_record(row)

    def activate(self, version_id: int) -> VersionRecord:
        """Make this version the active one of its name, retiring the previous one.

        One transaction: readers see either the old or the new active version, never
        none or two. Only ready or retired versions can be activated.
        """
        with self._writing() as session:
            name = session.scalar(select(IndexVersion.name).where(IndexVersion.id == version_id))
            if name is None:
                raise NotFoundError(f"no index version with id {version_id} in the store")
            # Lock every version of the name in one order, so concurrent activations
            # queue up instead of deadlocking.
            versions = session.scalars(
                select(IndexVersion)
                .where(IndexVersion.name == name)
                .order_by(IndexVersion.id)
                .with_for_update()
            ).all()
            row = next(version for version in versions if version.id == version_id)
            if row.state == VersionState.ACTIVE.value:
                return version_record(row)
            if row.state not in (VersionState.READY.value, VersionState.RETIRED.value):
                raise InvalidInputError(
                    f"index {version_label(row)} is {row.state}: only ready or retired versions "
                    "can be activated; finish the build and mark it ready first"
                )
            for version in versions:
                if version.state == VersionState.ACTIVE.value:
                    version.state = VersionState.RETIRED.value
            session.flush()  # retire first: the database allows one active per name
            row.state = VersionState.ACTIVE.value
            row.activated_at = utc_now()
            session.flush()
            return version_record(row)

    def delete_version(self, version_id: int, *, force: bool = False) -> list[LeaseRecord]:
        """Delete a version and its rows (not its FAISS file); the active one is refused.

        So is one that running servers still serve (VersionInUseError), unless ``force``;
        returns the live leases that ``force`` overrode.
        """
        with self._writing() as session:
            row = version_row(session, version_id, lock=True)
            if row.state == VersionState.ACTIVE.value:
                raise InvalidInputError(
                    f"index {version_label(row)} is active and cannot be deleted: activate another "
                    "version of it first"
                )
            overridden = live_leases_of(session, row.id)
            if overridden and not force:
                raise version_in_use(row, overridden)
            session.execute(delete(EntryStatistic).where(EntryStatistic.version_id == version_id))
            session.execute(delete(IndexVersion).where(IndexVersion.id == version_id))
        return overridden


def _lock_key(name: str) -> int:
    """A stable signed 32-bit key for ``name`` (Python's hash() differs per process)."""
    return zlib.crc32(name.encode()) - 2**31


def _describe_missing_version(session: Session, name: str, version: int | None) -> str:
    existing = session.execute(
        select(IndexVersion.version, IndexVersion.state)
        .where(IndexVersion.name == name)
        .order_by(IndexVersion.version)
    ).all()
    if not existing:
        names = session.scalars(
            select(IndexVersion.name).distinct().order_by(IndexVersion.name)
        ).all()
        if not names:
            return f"no index named {name!r}: the store has no indexes yet; build one first"
        return f"no index named {name!r}; the store has: {', '.join(names)}"
    listing = ", ".join(f"{number} ({state})" for number, state in existing)
    if version is None:
        return (
            f"index {name!r} has no active version (it has {listing}); activate a ready one first"
        )
    return f"index {name!r} has no version {version}; it has {listing}"


def _completeness_problems(session: Session, row: IndexVersion) -> list[str]:
    problems = []
    n_classes = session.scalar(
        select(func.count()).select_from(NormalClass).where(NormalClass.version_id == row.id)
    )
    assert n_classes is not None, "COUNT(*) returns one row"
    if n_classes == 0:
        problems.append("no normal classes written")
    n_entries = session.scalar(
        select(func.count())
        .select_from(DictionaryEntry)
        .where(DictionaryEntry.version_id == row.id)
    )
    searched_in_milvus = row.dictionary_store == "milvus"
    if searched_in_milvus:
        # Milvus holds the entries' texts and vectors: no entry rows here.
        if row.dictionary_options is None:
            problems.append("no Milvus collection recorded")
    elif n_entries != row.dictionary_size:
        problems.append(f"{n_entries} of {row.dictionary_size} dictionary entries written")
    if row.statistics_mode == StatisticsMode.MOMENTS.value:
        # Moments-mode versions score from the classes' moments: no per-entry rows.
        if row.faiss_checksum is None and not searched_in_milvus:
            problems.append("no FAISS file recorded")
        return problems
    per_class = dict(
        session.execute(
            select(EntryStatistic.class_position, func.count())
            .where(EntryStatistic.version_id == row.id)
            .group_by(EntryStatistic.class_position)
        ).all()
    )
    incomplete = [
        position
        for position in sorted(set(per_class) | set(range(n_classes)))
        if position >= n_classes or per_class.get(position, 0) != row.dictionary_size
    ]
    if incomplete:
        expected = n_classes * row.dictionary_size
        problems.append(
            f"{sum(per_class.values())} of {expected} entry statistics written ({n_classes} "
            f"classes x {row.dictionary_size} entries; incomplete or unknown classes: "
            f"{quote_positions(incomplete)})"
        )
    if row.faiss_checksum is None and not searched_in_milvus:
        problems.append("no FAISS file recorded")
    return problems


def _check_index_name(name: str) -> None:
    if not name or name != name.strip() or "@" in name or len(name) > SHORT_TEXT:
        raise InvalidInputError(
            f"index name {name!r} is not usable: use 1 to 200 characters, no '@' and no "
            "leading or trailing spaces"
        )
