"""The public description of an index version: what clients and JSON outputs see.

One definition of those fields, read by the server (to fill the protobuf IndexInfo),
the client (from it) and ``bliss index describe/list --json``; the store builds it from
its VersionRecord (:meth:`bliss.store.records.VersionRecord.info`). It imports only
protobuf, so the client-only install can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from bliss.v1 import scorer_pb2

InfoT = TypeVar("InfoT", bound="IndexVersionInfo")

# The proto nests a version's scoring defaults in IndexInfo.defaults, under these names;
# every other field has the same name in the dataclass and the proto.
_PROTO_DEFAULTS = {"default_k": "k", "default_lambda": "lambda_weight", "eps": "eps"}
# JSON keys that differ from the field names: `bliss index list --json` said "model" and
# "weights" before this type existed, and scripts read them.
_JSON_KEYS = {"model_name": "model", "model_weights": "weights"}


@dataclass(frozen=True)
class IndexVersionInfo:
    """One index version; datetimes are timezone-aware UTC (None: not known or not yet)."""

    name: str
    version: int
    model_name: str
    model_weights: str
    embedding_dim: int
    prompt_template: str
    dictionary_source: str
    dictionary_size: int
    faiss_kind: str
    default_k: int
    default_lambda: float
    eps: float
    created_at: datetime | None
    activated_at: datetime | None

    @property
    def label(self) -> str:
        """``name@version``, how messages and logs name a version."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (datetimes in ISO 8601), with ``label`` after ``version``."""
        body: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            body[_JSON_KEYS.get(field.name, field.name)] = value
            if field.name == "version":
                body["label"] = self.label
        return body

    def to_proto(self) -> scorer_pb2.IndexInfo:
        info = scorer_pb2.IndexInfo(label=self.label)
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _PROTO_DEFAULTS:
                setattr(info.defaults, _PROTO_DEFAULTS[field.name], value)
            elif isinstance(value, datetime):
                getattr(info, field.name).FromDatetime(value)
            elif isinstance(value, tuple):
                getattr(info, field.name).extend(value)
            elif value is not None:
                setattr(info, field.name, value)
        return info

    @classmethod
    def from_proto(cls: type[InfoT], info: scorer_pb2.IndexInfo) -> InfoT:
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name in _PROTO_DEFAULTS:
                values[field.name] = getattr(info.defaults, _PROTO_DEFAULTS[field.name])
                continue
            value = getattr(info, field.name)
            if isinstance(value, Timestamp):
                # An unset timestamp reads as the epoch: None says it was never sent.
                has = info.HasField(field.name)
                value = value.ToDatetime(tzinfo=timezone.utc) if has else None
            elif not isinstance(value, (str, int, float, bool)):
                value = tuple(value)  # a repeated field
            values[field.name] = value
        return cls(**values)


@dataclass(frozen=True)
class IndexInfo(IndexVersionInfo):
    """The version of an index that a server is serving, and how it serves it."""

    classes: tuple[str, ...]  # normal class names, in class order
    accepts_images: bool
    images_unavailable_reason: str
    calibrated: bool
    statistics_source: str
    loaded_at: datetime | None
