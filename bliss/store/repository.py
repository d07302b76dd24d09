"""The statistics store: index versions, their classes, dictionary entries and eq. 8 rows.

:class:`Store` is the only API the indexer, the server and local scoring use. It returns
frozen dataclasses, never ORM objects, so nothing outside this package holds a session.
Every write is one transaction; writers on SQLite take the write lock up front
(``BEGIN IMMEDIATE``) and on PostgreSQL lock the rows they depend on, so a crash or a bad
input mid-write leaves the store as it was.

Lifecycle of a version: ``building`` (rows and FAISS file are written) -> ``ready``
(complete, immutable) -> ``active`` (served; one per name) -> ``retired`` (replaced; can
be activated again). Only building versions accept writes.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePath
from types import TracebackType

import numpy as np
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bliss.calibration import Calibration
from bliss.errors import InvalidInputError, NotFoundError, StoreError
from bliss.recall_tuning import SearchTuning
from bliss.scoring import ScoringMode
from bliss.store import bulk_load
from bliss.store.build_locks import BuildLocks
from bliss.store.database import create_store_engine, display_url, prepare_schema
from bliss.store.leases import VersionLeases, live_leases_of, version_in_use
from bliss.store.models import (
    CalibrationScores,
    DictionaryEntry,
    EntryStatistic,
    IndexVersion,
    NormalClass,
)
from bliss.store.records import (
    ClassRecord,
    LeaseRecord,
    StatisticsMode,
    VersionRecord,
    VersionState,
    class_record,
    class_rows,
    version_record,
)
from bliss.store.sessions import utc_now

_INT32_MAX = 2**31 - 1
_CREATE_ATTEMPTS = 5  # backstop: creators that still collide retry
_CREATE_LOCK_SPACE = 0x626C6973  # PostgreSQL advisory lock space of create_version
_SHORT_TEXT = 200  # String(200) columns: names, model name, FAISS kind
_SHOWN_MISSING = 10  # positions quoted in a NotFoundError
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Store(VersionLeases, BuildLocks):
    """Queries and writes of the statistics store; open with :meth:`Store.open`.

    Version leases and build locks are in :mod:`bliss.store.leases` and
    :mod:`bliss.store.build_locks`.
    """

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

    # ----------------------------------------------------------------- versions

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
        _check_sha256("model checksum", model_checksum, optional=True)
        if faiss_path:
            _check_relative_path(faiss_path)
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
        _check_short("model_name", model_name)
        _check_short("faiss_kind", faiss_kind)
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

    def _insert_next_version(self, fields: dict[str, object]) -> VersionRecord:
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
            return version_record(_version_row(session, version_id))

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
        _check_relative_path(path)
        _check_short("faiss kind", kind)
        _check_sha256("FAISS checksum", checksum, optional=False)
        with self._writing() as session:
            row = _building_row(session, version_id, "recording the FAISS file")
            row.faiss_path, row.faiss_kind, row.faiss_checksum = path, kind, checksum

    def set_artifacts(self, version_id: int, checksum: str) -> None:
        """Record the sha256 of the version's serving-artifacts manifest."""
        _check_sha256("artifacts checksum", checksum, optional=False)
        with self._writing() as session:
            row = _building_row(session, version_id, "recording the serving artifacts")
            row.artifacts_checksum = checksum

    def set_dictionary_store(self, version_id: int, store: str, options: str) -> None:
        """Record that the version's dictionary is searched in ``store`` (``milvus``),
        with ``options`` (JSON) saying where and how."""
        if store != "milvus":
            raise InvalidInputError(f"unknown dictionary store {store!r}: expected milvus")
        with self._writing() as session:
            row = _building_row(session, version_id, "recording the dictionary store")
            row.dictionary_store, row.dictionary_options = store, options

    def set_search_tuning(self, version_id: int, tuning: SearchTuning) -> None:
        """Record the recall-tuned search parameter and what it measured."""
        _check_short("search parameter", tuning.parameter)
        for what, value in (("target recall", tuning.target), ("recall", tuning.recall)):
            if not 0.0 <= value <= 1.0:
                raise InvalidInputError(f"{what} must be in [0, 1], got {value}")
        change = tuning.max_score_change
        if change is not None and not (math.isfinite(change) and change >= 0):
            raise InvalidInputError(f"max score change must be finite and >= 0, got {change}")
        with self._writing() as session:
            row = _building_row(session, version_id, "recording the search tuning")
            row.search_parameter, row.search_value = tuning.parameter, int(tuning.value)
            row.target_recall, row.measured_recall = tuning.target, tuning.recall
            row.max_score_change = change

    def mark_ready(self, version_id: int) -> VersionRecord:
        """building -> ready, once classes, entries, statistics and FAISS file are written.

        A version that is already ready is returned unchanged (the indexer may resume).
        """
        with self._writing() as session:
            row = _version_row(session, version_id, lock=True)
            if row.state == VersionState.READY.value:
                return version_record(row)
            if row.state != VersionState.BUILDING.value:
                raise InvalidInputError(
                    f"index {_label(row)} is {row.state}: only building versions can be "
                    "marked ready"
                )
            problems = _completeness_problems(session, row)
            if problems:
                raise StoreError(
                    f"index {_label(row)} is incomplete, so it cannot be marked ready: "
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
                    f"index {_label(row)} is {row.state}: only ready or retired versions can "
                    "be activated; finish the build and mark it ready first"
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
            row = _version_row(session, version_id, lock=True)
            if row.state == VersionState.ACTIVE.value:
                raise InvalidInputError(
                    f"index {_label(row)} is active and cannot be deleted: activate another "
                    "version of it first"
                )
            overridden = live_leases_of(session, row.id)
            if overridden and not force:
                raise version_in_use(row, overridden)
            session.execute(delete(EntryStatistic).where(EntryStatistic.version_id == version_id))
            session.execute(delete(IndexVersion).where(IndexVersion.id == version_id))
        return overridden

    # ------------------------------------------------------------------ classes

    def write_classes(self, version_id: int, classes: Sequence[ClassRecord]) -> None:
        """Replace the version's normal classes (positions must be 0..n-1)."""
        with self._writing() as session:
            row = _building_row(session, version_id, "writing classes")
            new_rows = class_rows(row, classes)
            session.execute(delete(NormalClass).where(NormalClass.version_id == version_id))
            session.add_all(new_rows)

    def load_classes(self, version_id: int) -> list[ClassRecord]:
        """The version's normal classes, by position."""
        with self._reading() as session:
            _version_row(session, version_id)
            rows = session.scalars(
                select(NormalClass)
                .where(NormalClass.version_id == version_id)
                .order_by(NormalClass.position)
            )
            return [class_record(row) for row in rows]

    # ------------------------------------------------------- dictionary entries

    def write_entries(
        self, version_id: int, texts: Iterable[str], *, batch_size: int = 50_000
    ) -> int:
        """Replace the version's dictionary entries with ``texts`` (positions 0..t-1).

        ``texts`` is streamed, never held whole; t must equal the version's
        dictionary_size. Returns t.
        """
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        with self._writing() as session:
            row = _building_row(session, version_id, "writing dictionary entries")
            if session.get(DictionaryEntry, (version_id, 0)) is not None:
                session.execute(
                    delete(DictionaryEntry).where(DictionaryEntry.version_id == version_id)
                )
            count = bulk_load.insert_entries(
                session.connection(), version_id, _checked_texts(texts), batch_size
            )
            if count != row.dictionary_size:
                raise InvalidInputError(
                    f"got {count} dictionary entries for index {_label(row)}, but its "
                    f"dictionary_size is {row.dictionary_size}; nothing was written"
                )
            return count

    def count_entries(self, version_id: int) -> int:
        """How many dictionary entries the version has."""
        with self._reading() as session:
            return session.scalar(
                select(func.count())
                .select_from(DictionaryEntry)
                .where(DictionaryEntry.version_id == version_id)
            )

    def entry_texts(self, version_id: int, positions: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of the entries at ``positions``, in the order asked (repeats allowed)."""
        wanted = _positions(positions)
        unique, inverse = np.unique(wanted, return_inverse=True)
        with self._reading() as session:
            texts = bulk_load.gather_entry_texts(
                session.connection(), version_id, _int32_values(unique)
            )
            missing = [int(p) for p in unique if int(p) not in texts]
            if missing:
                row = _version_row(session, version_id)
                raise NotFoundError(
                    f"index {_label(row)} has no dictionary entries at positions "
                    f"{_quote_positions(missing)}; its positions are 0..{row.dictionary_size - 1}"
                )
        ordered = [texts[int(p)] for p in unique]
        return [ordered[i] for i in inverse.ravel()]

    def iter_entry_texts(self, version_id: int, *, batch_size: int = 50_000) -> Iterator[str]:
        """All entry texts by position, fetched ``batch_size`` at a time."""
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        self.get_version_by_id(version_id)
        return self._entry_text_batches(version_id, batch_size)

    def _entry_text_batches(self, version_id: int, batch_size: int) -> Iterator[str]:
        # Keyset pagination: no connection is held while the caller consumes a batch.
        start = 0
        while True:
            with self._reading() as session:
                batch = session.execute(
                    select(DictionaryEntry.position, DictionaryEntry.text)
                    .where(
                        DictionaryEntry.version_id == version_id,
                        DictionaryEntry.position >= start,
                    )
                    .order_by(DictionaryEntry.position)
                    .limit(batch_size)
                ).all()
            if not batch:
                return
            for _position, entry_text in batch:
                yield entry_text
            start = batch[-1][0] + 1

    # --------------------------------------------------------- entry statistics

    def write_entry_statistics(
        self, version_id: int, start: int, mean: np.ndarray, std: np.ndarray
    ) -> None:
        """Replace the eq. 8 rows of entries start..start+b-1 for every class, from
        ``mean``/``std`` float64 [N, b] (N = the version's classes, written first).

        Writing blocks of entries in order keeps the inserts in key order, so a
        million-row block is an append and a huge dictionary one pass over the table.
        """
        with self._writing() as session:
            row = _building_row(session, version_id, "writing entry statistics")
            classes = session.scalar(
                select(func.count())
                .select_from(NormalClass)
                .where(NormalClass.version_id == version_id)
            )
            mean_values = _statistics_block("mean", mean, row, classes, start)
            std_values = _statistics_block("std", std, row, classes, start)
            if (std_values < 0).any():
                row_index, column = np.argwhere(std_values < 0)[0]
                raise InvalidInputError(
                    f"std has negative values (first: class {row_index}, entry "
                    f"{start + column}); a standard deviation is >= 0"
                )
            session.execute(
                delete(EntryStatistic).where(
                    EntryStatistic.version_id == version_id,
                    EntryStatistic.entry_position >= start,
                    EntryStatistic.entry_position < start + mean_values.shape[1],
                )
            )
            bulk_load.insert_entry_statistics(
                session.connection(), version_id, start, mean_values, std_values
            )

    def count_entry_statistics(self, version_id: int, class_position: int | None = None) -> int:
        """How many statistics rows the version has (of one class when given)."""
        query = (
            select(func.count())
            .select_from(EntryStatistic)
            .where(EntryStatistic.version_id == version_id)
        )
        if class_position is not None:
            query = query.where(EntryStatistic.class_position == class_position)
        with self._reading() as session:
            return session.scalar(query)

    def entry_statistics(
        self, version_id: int, positions: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gather eq. 8 for entries ``positions`` (any order, repeats allowed).

        Returns mean and std float64 [n_classes, len(positions)], columns in the order
        asked. NotFoundError when some (class, entry) row is missing.
        """
        wanted = _positions(positions)
        unique, inverse = np.unique(wanted, return_inverse=True)
        with self._reading() as session:
            entries, classes, means, stds = bulk_load.gather_entry_statistics(
                session.connection(), version_id, _int32_values(unique)
            )
            wanted_class = classes < n_classes
            entries, classes = entries[wanted_class], classes[wanted_class]
            columns = np.searchsorted(unique, entries)
            mean = np.zeros((n_classes, len(unique)), dtype=np.float64)
            std = np.zeros((n_classes, len(unique)), dtype=np.float64)
            found = np.zeros((n_classes, len(unique)), dtype=bool)
            mean[classes, columns] = means[wanted_class]
            std[classes, columns] = stds[wanted_class]
            found[classes, columns] = True
            if not found.all():
                missing = unique[~found.all(axis=0)].tolist()
                row = _version_row(session, version_id)
                raise NotFoundError(
                    f"index {_label(row)} has no entry statistics for all {n_classes} classes "
                    f"at dictionary positions {_quote_positions(missing)}; its positions are "
                    f"0..{row.dictionary_size - 1} and a complete version has every class"
                )
        columns = inverse.ravel()
        return mean[:, columns], std[:, columns]

    def all_entry_statistics(
        self, version_id: int, n_classes: int, n_entries: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every eq. 8 row of the version: mean and std float64 [n_classes, n_entries]."""
        with self._reading() as session:
            row = _version_row(session, version_id)
            mean, std, count = bulk_load.read_entry_statistics(
                session.connection(), version_id, n_classes, n_entries
            )
        if count != n_classes * n_entries:
            raise NotFoundError(
                f"index {_label(row)} has {count} of the {n_classes * n_entries} entry "
                f"statistics of {n_classes} classes x {n_entries} entries; the version is "
                "incomplete (or has fewer classes or entries than asked for)"
            )
        return mean, std

    # ------------------------------------------------------------------ calibration

    def write_calibration(self, version_id: int, calibration: Calibration) -> None:
        """Replace the version's held-out normal scores (one row per scoring mode)."""
        with self._writing() as session:
            _building_row(session, version_id, "writing calibration scores")
            session.execute(
                delete(CalibrationScores).where(CalibrationScores.version_id == version_id)
            )
            session.add_all(
                CalibrationScores(
                    version_id=version_id,
                    mode=mode.value,
                    k=calibration.k,
                    lam=calibration.lam,
                    sample_count=len(scores),
                    sorted_scores=np.sort(scores).astype("<f8").tobytes(),
                )
                for mode, scores in calibration.sorted_scores.items()
            )

    def load_calibration(self, version_id: int) -> Calibration | None:
        """The version's calibration, or None when it was built without one."""
        with self._reading() as session:
            rows = session.scalars(
                select(CalibrationScores).where(CalibrationScores.version_id == version_id)
            ).all()
            if not rows:
                return None
            return Calibration(
                k=rows[0].k,
                lam=rows[0].lam,
                sorted_scores={
                    ScoringMode(row.mode): np.frombuffer(row.sorted_scores, dtype="<f8")
                    for row in rows
                },
            )


# --------------------------------------------------------------------- module helpers


def _lock_key(name: str) -> int:
    """A stable signed 32-bit key for ``name`` (Python's hash() differs per process)."""
    return zlib.crc32(name.encode()) - 2**31


def _label(row: IndexVersion) -> str:
    return f"{row.name}@{row.version}"


def _version_row(session: Session, version_id: int, *, lock: bool = False) -> IndexVersion:
    query = select(IndexVersion).where(IndexVersion.id == version_id)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None:
        raise NotFoundError(f"no index version with id {version_id} in the store")
    return row


def _building_row(session: Session, version_id: int, action: str) -> IndexVersion:
    # FOR SHARE on PostgreSQL: writers of one version run together, mark_ready waits.
    row = session.scalars(
        select(IndexVersion).where(IndexVersion.id == version_id).with_for_update(read=True)
    ).first()
    if row is None:
        raise NotFoundError(f"no index version with id {version_id} in the store")
    if row.state != VersionState.BUILDING.value:
        raise InvalidInputError(
            f"index {_label(row)} is {row.state}, so {action} is refused: only building "
            "versions change; build a new version instead"
        )
    return row


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
            f"{_quote_positions(incomplete)})"
        )
    if row.faiss_checksum is None and not searched_in_milvus:
        problems.append("no FAISS file recorded")
    return problems


def _statistics_block(
    what: str, values: np.ndarray, version: IndexVersion, classes: int, start: int
) -> np.ndarray:
    array = np.asarray(values)
    if classes == 0:
        raise InvalidInputError(
            f"index {_label(version)} has no classes yet: write the classes before their statistics"
        )
    if array.ndim != 2 or array.shape[0] != classes or array.shape[1] == 0:
        raise InvalidInputError(
            f"{what} must have shape [{classes}, b] (one row per class of index "
            f"{_label(version)}), got {array.shape}"
        )
    if start < 0 or start + array.shape[1] > version.dictionary_size:
        raise InvalidInputError(
            f"entries {start}..{start + array.shape[1] - 1} are outside the dictionary of "
            f"index {_label(version)} (0..{version.dictionary_size - 1})"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"{what} must be floats, got {array.dtype}")
    finite = np.isfinite(array)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise InvalidInputError(
            f"{what} has {int((~finite).sum())} non-finite values "
            f"(first: class {row}, entry {start + column})"
        )
    return array.astype(np.float64, copy=False)


def _int32_values(positions: np.ndarray) -> list[int]:
    """The positions a query can match (the others are missing by definition)."""
    return positions[(positions >= 0) & (positions <= _INT32_MAX)].tolist()


def _positions(positions: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(positions)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(
            f"positions must be a 1-D array of integers, got shape {array.shape} and "
            f"dtype {array.dtype}"
        )
    return array.astype(np.int64, copy=False)


def _quote_positions(positions: Sequence[int]) -> str:
    shown = ", ".join(str(position) for position in positions[:_SHOWN_MISSING])
    more = len(positions) - _SHOWN_MISSING
    return f"{shown} (and {more} more)" if more > 0 else shown


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for position, entry_text in enumerate(texts):
        if not isinstance(entry_text, str):
            raise InvalidInputError(
                f"dictionary entry {position} is a {type(entry_text).__name__}, not a string"
            )
        if "\x00" in entry_text:
            raise InvalidInputError(f"dictionary entry {position} contains a NUL character")
        yield entry_text


def _check_index_name(name: str) -> None:
    if not name or name != name.strip() or "@" in name or len(name) > _SHORT_TEXT:
        raise InvalidInputError(
            f"index name {name!r} is not usable: use 1 to 200 characters, no '@' and no "
            "leading or trailing spaces"
        )


def _check_short(what: str, value: str) -> None:
    if len(value) > _SHORT_TEXT:
        raise InvalidInputError(f"{what} is {len(value)} characters; at most {_SHORT_TEXT} fit")


def _check_sha256(what: str, value: str | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if value is None or not _SHA256.fullmatch(value):
        raise InvalidInputError(f"{what} must be a sha256 hex digest (64 lowercase hex digits)")


def _check_relative_path(path: str) -> None:
    if not path or PurePath(path).is_absolute():
        raise InvalidInputError(
            f"FAISS path {path!r} must be a non-empty path relative to the data directory"
        )
