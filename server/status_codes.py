"""The gRPC status of every expected failure, and the server's own error classes.

Scoring code raises :class:`~bliss.errors.BlissError` subclasses whose message names the
offending item; the servicer turns them into a status with :func:`status_code_for`.
"""

from __future__ import annotations

import grpc
from sqlalchemy.exc import SQLAlchemyError

from bliss.errors import (
    BlissError,
    InvalidInputError,
    NotFoundError,
    StoreError,
    WeightsUnavailableError,
)


class BatchTooLargeError(BlissError):
    """A request carries more items than the server's configured maximum."""


class ImagesUnavailableError(BlissError):
    """The index cannot encode images (precomputed embeddings, or no usable model)."""


class IndexUnavailableError(BlissError):
    """The index is active in the store but not loaded here (loading, or its load failed)."""


class EncodingFailedError(BlissError):
    """The image encoder failed on a micro-batch (not the caller's fault)."""


class NonFiniteScoreError(BlissError):
    """Scoring produced NaN or inf for valid input: the index is broken, not the request."""


class IndexReadError(BlissError):
    """Reading a loaded version failed while scoring (missing rows, corrupt files)."""


_CODES: tuple[tuple[type[BlissError], grpc.StatusCode], ...] = (
    (BatchTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ImagesUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (IndexUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (EncodingFailedError, grpc.StatusCode.INTERNAL),
    (NonFiniteScoreError, grpc.StatusCode.INTERNAL),
    (IndexReadError, grpc.StatusCode.INTERNAL),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (WeightsUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    # The store is unreachable or locked: transient, so clients may retry elsewhere.
    (StoreError, grpc.StatusCode.UNAVAILABLE),
)


def store_failure(error: SQLAlchemyError, store_url: str) -> StoreError:
    """One line for a database error the store did not translate itself (a SQLite file
    that is no database, a dropped connection); its SQL and traceback stay out of it."""
    cause = getattr(error, "orig", None) or error
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return StoreError(
        f"the store at {store_url} failed: {reason}; check that the database is running, "
        "reachable, not locked and not corrupt (restore a damaged SQLite file from a backup), "
        "and that --store-url / BLISS_STORE_URL is right"
    )


def status_code_for(error: BlissError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL
