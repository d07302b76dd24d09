"""Python values to protobuf requests and protobuf responses to Python values.

Results come back as :class:`bliss.scored_item.ScoredItem`, the objects ``bliss score
--local`` prints, so remote and local scoring write identical JSON lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bliss.errors import BlissError, InvalidInputError, NotFoundError
from bliss.scored_item import ScoredItem, TopEntry
from bliss.v1 import scorer_pb2

ImageInput = bytes | str | PathLike


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field named by the server: ``items[3].embedding``, ``options.k``."""

    field: str
    description: str


class ScoringServiceError(BlissError):
    """A call failed; ``code`` is the gRPC status (INVALID_ARGUMENT, UNAVAILABLE, ...).

    ``violations`` lists the invalid request fields when the server named them (the
    google.rpc.BadRequest details of an INVALID_ARGUMENT status), else it is empty.
    """

    def __init__(
        self, code: grpc.StatusCode, details: str, violations: Sequence[FieldViolation] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.violations = tuple(violations)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ScoringServiceError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "(no details)", _field_violations(error))


def _field_violations(error: grpc.RpcError) -> tuple[FieldViolation, ...]:
    """BadRequest field violations from the status details trailer, if there are any."""
    if not hasattr(error, "trailing_metadata"):
        return ()
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return ()  # details that disagree with the status itself: not trusted
    if status is None:
        return ()
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
    return tuple(violations)


@dataclass(frozen=True)
class Batch:
    """One batch to score: embeddings [B, D] and/or images, optional ids (one per input)."""

    embeddings: np.ndarray | Sequence[np.ndarray] | None = None
    images: Sequence[ImageInput] | None = None
    ids: Sequence[str] | None = None


def score_request(batch: Batch, options: scorer_pb2.ScoreOptions) -> scorer_pb2.ScoreRequest:
    """Embeddings first, then images, each item with its id (default: its position)."""
    rows = _embedding_rows(batch.embeddings)
    images = list(batch.images or ())
    count = len(rows) + len(images)
    if count == 0:
        raise InvalidInputError("nothing to score: pass embeddings and/or images")
    ids = _ids(batch, rows, images)
    request = scorer_pb2.ScoreRequest(options=options)
    items = request.items
    for item_id, row in zip(ids[: len(rows)], rows, strict=True):
        item = items.add()
        item.id = item_id
        item.embedding.values = row.tobytes()
        item.embedding.dim = row.shape[0]
    for item_id, image in zip(ids[len(rows) :], images, strict=True):
        item = items.add()
        item.id = item_id
        item.image = _image_bytes(image)
    return request


def _embedding_rows(embeddings: np.ndarray | Sequence[np.ndarray] | None) -> np.ndarray:
    if embeddings is None:
        return np.empty((0, 0), dtype="<f4")
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise InvalidInputError(f"embeddings must have shape [B, D], got {array.shape}")
    return np.ascontiguousarray(array, dtype="<f4")


def _ids(batch: Batch, rows: np.ndarray, images: list[ImageInput]) -> list[str]:
    count = len(rows) + len(images)
    if batch.ids is not None:
        ids = [str(item_id) for item_id in batch.ids]
        if len(ids) != count:
            raise InvalidInputError(f"{len(ids)} ids for {count} inputs: give one id per input")
        return ids
    ids = [str(position) for position in range(len(rows))]
    for position, image in enumerate(images, start=len(rows)):
        ids.append(str(image) if isinstance(image, (str, PathLike)) else str(position))
    return ids


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    path = Path(image)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"image file {path} does not exist") from None
    except OSError as error:
        raise InvalidInputError(f"cannot read image {path}: {error}") from error


def scored_items(response: scorer_pb2.ScoreResponse) -> list[ScoredItem]:
    names = tuple(response.class_names)
    return [_scored_item(result, names) for result in response.results]


def _scored_item(result: scorer_pb2.ScoreResult, class_names: tuple[str, ...]) -> ScoredItem:
    entries = result.top_entries
    return ScoredItem(
        id=result.id,
        index_version=result.index_version,
        score=result.score,
        internal_class_score=result.internal_class_score,
        external_text_score=result.external_text_score,
        nearest_class=result.nearest_class,
        top_entries=tuple(TopEntry(e.text, e.similarity) for e in entries) if entries else (),
        class_scores=(
            dict(zip(class_names, result.class_scores, strict=True)) if class_names else None
        ),
        normal_quantile=result.normal_quantile if result.HasField("normal_quantile") else None,
    )
