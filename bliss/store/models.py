"""The store's tables as typed SQLAlchemy ORM classes.

These classes describe the schema; the schema itself is created by the Alembic
migrations in ``bliss.migrations`` (the migrations together mirror this module exactly, and a test
checks there is no drift). Arrays are stored as little-endian bytes; every float column
is double precision on both SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Explicit constraint names: Alembic's batch mode on SQLite and downgrades need them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

VERSION_STATES = ("building", "ready", "active", "retired")
STATISTICS_MODES = ("table", "moments")
ACTIVE_STATE_CLAUSE = "state = 'active'"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        float: Double(),
        datetime: DateTime(timezone=True),
        bytes: LargeBinary(),
    }


class IndexVersion(Base):
    """One build of a named index: model, dictionary, FAISS file and defaults."""

    __tablename__ = "index_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint(
            "state IN ({})".format(", ".join(f"'{state}'" for state in VERSION_STATES)),
            name="state",
        ),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint(
            "statistics_mode IN ({})".format(", ".join(f"'{mode}'" for mode in STATISTICS_MODES)),
            name="statistics_mode",
        ),
        # At most one active version per name, enforced by the database itself.
        Index(
            "ux_index_versions_active_name",
            "name",
            unique=True,
            sqlite_where=text(ACTIVE_STATE_CLAUSE),
            postgresql_where=text(ACTIVE_STATE_CLAUSE),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(200))
    model_weights: Mapped[str] = mapped_column(Text)
    model_checksum: Mapped[str | None] = mapped_column(String(64))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    prompt_template: Mapped[str] = mapped_column(Text)
    dictionary_source: Mapped[str] = mapped_column(Text)
    dictionary_size: Mapped[int] = mapped_column(Integer)
    faiss_path: Mapped[str] = mapped_column(Text)
    faiss_kind: Mapped[str] = mapped_column(String(200))
    faiss_checksum: Mapped[str | None] = mapped_column(String(64))
    default_k: Mapped[int] = mapped_column(Integer)
    default_lambda: Mapped[float]
    eps: Mapped[float]
    build_fingerprint: Mapped[str] = mapped_column(String(64))
    # "table": eq. 8 rows per (class, entry); "moments": per-class mean and covariance.
    statistics_mode: Mapped[str] = mapped_column(String(16), server_default="table")
    # sha256 of the serving artifacts' manifest (None: a version built before them).
    artifacts_checksum: Mapped[str | None] = mapped_column(String(64))
    # The version this one extends (bliss index extend), if any.
    parent_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("index_versions.id", ondelete="SET NULL")
    )
    # Where the dictionary is searched: "faiss" (faiss_path) or "milvus" (options as JSON).
    dictionary_store: Mapped[str] = mapped_column(String(16), server_default="faiss")
    dictionary_options: Mapped[str | None] = mapped_column(Text)
    # Approximate search tuned to a recall target: parameter, value and what it achieved.
    search_parameter: Mapped[str | None] = mapped_column(String(32))
    search_value: Mapped[int | None] = mapped_column(Integer)
    target_recall: Mapped[float | None]
    measured_recall: Mapped[float | None]
    max_score_change: Mapped[float | None]
    created_at: Mapped[datetime]
    ready_at: Mapped[datetime | None]
    activated_at: Mapped[datetime | None]


class NormalClass(Base):
    """A normal class of a version: label embedding, eq. 4 statistics, moments.

    The moments (count, mean, centred covariance of the normal embeddings) are what
    moments-mode versions score with, and what ``bliss index extend`` merges new images into.
    """

    __tablename__ = "normal_classes"
    __table_args__ = (
        UniqueConstraint("version_id", "position"),
        UniqueConstraint("version_id", "name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("index_versions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    label_embedding: Mapped[bytes]  # float32 [D], little-endian
    label_mean: Mapped[float]
    label_std: Mapped[float]
    sample_count: Mapped[int] = mapped_column(Integer)
    moment_mean: Mapped[bytes]  # float64 [D], little-endian
    moment_covariance: Mapped[bytes]  # float64 [D, D] centred, ddof 0, row-major


class DictionaryEntry(Base):
    """A dictionary entry's text; its position is its FAISS id."""

    __tablename__ = "dictionary_entries"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 (clustered on the key)

    version_id: Mapped[int] = mapped_column(
        ForeignKey("index_versions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)


class EntryStatistic(Base):
    """Eq. 8 for one (class, entry): mean and std of sim(normal image, entry).

    The key starts with the entry so that gathering the statistics of a few entries for
    all classes is a primary-key range scan. There is deliberately no foreign key to
    index_versions: PostgreSQL would check it once per bulk-loaded row (most of the load
    time); :meth:`Store.delete_version` deletes these rows itself.
    """

    __tablename__ = "entry_statistics"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 (clustered on the key)

    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entry_position: Mapped[int] = mapped_column(Integer, primary_key=True)
    class_position: Mapped[int] = mapped_column(Integer, primary_key=True)
    mean: Mapped[float]
    std: Mapped[float]


class CalibrationScores(Base):
    """Sorted scores of a version's held-out normal images in one scoring mode.

    ``k`` and ``lam`` are the settings the scores were computed with (the version's
    defaults); ic and ic_raw scores do not depend on them.
    """

    __tablename__ = "calibration_scores"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("index_versions.id", ondelete="CASCADE"), primary_key=True
    )
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    k: Mapped[int] = mapped_column(Integer)
    lam: Mapped[float]
    sample_count: Mapped[int] = mapped_column(Integer)
    sorted_scores: Mapped[bytes]  # float64 [sample_count], ascending, little-endian


class VersionLease(Base):
    """A running server's claim on a version it serves (or is loading, or draining).

    Renewed every poll interval; a lease whose ``expires_at`` has passed belongs to a
    server that stopped renewing it (crashed, or cut off from the store) and counts for
    nothing. ``bliss index delete`` refuses a version with a live lease.
    """

    __tablename__ = "version_leases"
    __table_args__ = (Index("ix_version_leases_server_id", "server_id"),)

    version_id: Mapped[int] = mapped_column(
        ForeignKey("index_versions.id", ondelete="CASCADE"), primary_key=True
    )
    server_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime]
    renewed_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class BuildLock(Base):
    """Who builds (name, fingerprint) right now, so identical builds do the work once.

    On SQLite this row *is* the lock (taken over when its owner is dead or silent); on
    PostgreSQL the lock is a session advisory lock and the row only says who holds it.
    """

    __tablename__ = "build_locks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))  # random token of the holding process
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
