"""What the store returns: frozen records of versions and classes, and their row mapping.

One definition of a version's fields and of a class's fields, imported by every layer
(indexer, server, CLI). Records never hold ORM objects, so nothing outside the store
package holds a session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from enum import Enum

import numpy as np

from bliss.class_statistics import ClassMoments
from bliss.errors import InvalidInputError
from bliss.index_version_info import IndexVersionInfo
from bliss.recall_tuning import SearchTuning
from bliss.store.models import BuildLock, IndexVersion, NormalClass, VersionLease


class VersionState(str, Enum):
    """Lifecycle state of an index version (a StrEnum that also works on Python 3.10)."""

    BUILDING = "building"
    READY = "ready"
    ACTIVE = "active"
    RETIRED = "retired"

    def __str__(self) -> str:
        return self.value


class StatisticsMode(str, Enum):
    """How a version keeps the eq. 8 statistics of its dictionary entries."""

    TABLE = "table"  # one (mean, std) per (class, entry): fastest to serve, O(N t) storage
    MOMENTS = "moments"  # per-class mean and covariance: O(N D^2), computed per hit

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VersionRecord:
    """One index version as stored; datetimes are timezone-aware UTC."""

    id: int
    name: str
    version: int
    state: VersionState
    model_name: str
    model_weights: str
    model_checksum: str | None
    embedding_dim: int
    prompt_template: str
    dictionary_source: str
    dictionary_size: int
    faiss_path: str
    faiss_kind: str
    faiss_checksum: str | None
    default_k: int
    default_lambda: float
    eps: float
    build_fingerprint: str
    created_at: datetime
    ready_at: datetime | None
    activated_at: datetime | None
    statistics_mode: StatisticsMode = StatisticsMode.TABLE
    artifacts_checksum: str | None = None
    parent_version_id: int | None = None
    search_tuning: SearchTuning | None = None
    dictionary_store: str = "faiss"  # or "milvus": see dictionary_options
    dictionary_options: str | None = None  # MilvusDictionaryOptions as JSON

    @property
    def label(self) -> str:
        """``name@version``, how messages and logs name a version."""
        return f"{self.name}@{self.version}"

    def info(self) -> IndexVersionInfo:
        """The public description of this version, as clients and JSON outputs see it."""
        return IndexVersionInfo(
            **{field.name: getattr(self, field.name) for field in fields(IndexVersionInfo)}
        )


# eq=False: the generated __eq__ would compare arrays element-wise and raise.
@dataclass(frozen=True, eq=False)
class ClassRecord:
    """A normal class: label embedding, eq. 4 statistics and moments of its images."""

    position: int
    name: str
    prompt: str
    label_embedding: np.ndarray  # float32 [D]
    label_mean: float
    label_std: float
    sample_count: int
    moment_mean: np.ndarray  # float64 [D]
    moment_covariance: np.ndarray  # float64 [D, D], centred, ddof 0

    @property
    def moments(self) -> ClassMoments:
        return ClassMoments.from_covariance(
            self.sample_count, self.moment_mean, self.moment_covariance
        )


@dataclass(frozen=True)
class LeaseRecord:
    """A server's lease on a version: who holds it, since when, until when unless renewed."""

    version_id: int
    server_id: str
    host: str
    pid: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class BuildLockRecord:
    """Who holds the build lock of (name, fingerprint), and when it last said so."""

    name: str
    fingerprint: str
    host: str
    pid: int
    acquired_at: datetime
    heartbeat_at: datetime


def version_record(row: IndexVersion) -> VersionRecord:
    tuning = None
    if row.search_parameter is not None:
        tuning = SearchTuning(
            parameter=row.search_parameter, value=int(row.search_value or 0),
            recall=float(row.measured_recall or 0.0), target=float(row.target_recall or 0.0),
            max_score_change=row.max_score_change,
        )  # fmt: skip
    return VersionRecord(
        id=row.id, name=row.name, version=row.version, state=VersionState(row.state),
        model_name=row.model_name, model_weights=row.model_weights,
        model_checksum=row.model_checksum, embedding_dim=row.embedding_dim,
        prompt_template=row.prompt_template, dictionary_source=row.dictionary_source,
        dictionary_size=row.dictionary_size, faiss_path=row.faiss_path,
        faiss_kind=row.faiss_kind, faiss_checksum=row.faiss_checksum,
        default_k=row.default_k, default_lambda=row.default_lambda, eps=row.eps,
        build_fingerprint=row.build_fingerprint, created_at=utc(row.created_at),
        ready_at=_utc_or_none(row.ready_at), activated_at=_utc_or_none(row.activated_at),
        statistics_mode=StatisticsMode(row.statistics_mode or "table"),
        artifacts_checksum=row.artifacts_checksum, parent_version_id=row.parent_version_id,
        search_tuning=tuning, dictionary_store=row.dictionary_store or "faiss",
        dictionary_options=row.dictionary_options,
    )  # fmt: skip


def class_rows(version: IndexVersion, classes: Sequence[ClassRecord]) -> list[NormalClass]:
    positions = sorted(record.position for record in classes)
    if positions != list(range(len(classes))):
        raise InvalidInputError(
            f"class positions must be 0..{len(classes) - 1}, each once; got {positions}"
        )
    names = [record.name for record in classes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidInputError(f"class names must be unique; repeated: {duplicates}")
    return [_class_row(version, record) for record in classes]


def _class_row(version: IndexVersion, record: ClassRecord) -> NormalClass:
    dim = version.embedding_dim
    where = f"class {record.position} ({record.name!r})"
    if not record.name:
        raise InvalidInputError(f"class {record.position} has an empty name")
    embedding = _finite_array(f"{where} label_embedding", record.label_embedding, (dim,))
    mean = _finite_array(f"{where} moment_mean", record.moment_mean, (dim,))
    covariance = _finite_array(f"{where} moment_covariance", record.moment_covariance, (dim, dim))
    if not (math.isfinite(record.label_mean) and math.isfinite(record.label_std)):
        raise InvalidInputError(f"{where} label_mean and label_std must be finite")
    if record.label_std < 0:
        raise InvalidInputError(f"{where} label_std must be >= 0, got {record.label_std}")
    if record.sample_count < 1:
        raise InvalidInputError(
            f"{where} sample_count must be at least 1 (its statistics come from its normal "
            f"images), got {record.sample_count}"
        )
    return NormalClass(
        version_id=version.id, position=record.position, name=record.name,
        prompt=record.prompt,
        label_embedding=embedding.astype("<f4").tobytes(),
        label_mean=float(record.label_mean), label_std=float(record.label_std),
        sample_count=int(record.sample_count),
        moment_mean=mean.astype("<f8").tobytes(),
        moment_covariance=covariance.astype("<f8").tobytes(),
    )  # fmt: skip


def class_record(row: NormalClass) -> ClassRecord:
    mean = np.frombuffer(row.moment_mean, dtype="<f8").astype(np.float64)
    dim = len(mean)
    return ClassRecord(
        position=row.position, name=row.name, prompt=row.prompt,
        label_embedding=np.frombuffer(row.label_embedding, dtype="<f4").astype(np.float32),
        label_mean=row.label_mean, label_std=row.label_std, sample_count=row.sample_count,
        moment_mean=mean,
        moment_covariance=np.frombuffer(row.moment_covariance, dtype="<f8")
        .astype(np.float64).reshape(dim, dim),
    )  # fmt: skip


def lease_record(row: VersionLease) -> LeaseRecord:
    return LeaseRecord(
        version_id=row.version_id, server_id=row.server_id, host=row.host, pid=row.pid,
        acquired_at=utc(row.acquired_at), renewed_at=utc(row.renewed_at),
        expires_at=utc(row.expires_at),
    )  # fmt: skip


def build_lock_record(row: BuildLock) -> BuildLockRecord:
    return BuildLockRecord(
        name=row.name, fingerprint=row.fingerprint, host=row.host, pid=row.pid,
        acquired_at=utc(row.acquired_at), heartbeat_at=utc(row.heartbeat_at),
    )  # fmt: skip


def _finite_array(what: str, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != shape:
        raise InvalidInputError(f"{what} must have shape {shape}, got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise InvalidInputError(f"{what} must be finite floats (dtype {array.dtype})")
    return array


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite returns naive ones, written as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)
