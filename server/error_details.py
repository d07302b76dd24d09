"""What a failed call tells the client: a capped one-line message plus structured details.

Request-controlled text (item ids, index names) is shortened before it enters a message,
so a 100 KB id never becomes a 100 KB log line or a status trailer the client cannot
read (gRPC clients refuse trailers over 8 KiB by default). Invalid fields travel as
``google.rpc.BadRequest`` field violations in the ``grpc-status-details-bin`` trailer
(grpcio-status), which the bliss client exposes as ``ScoringServiceError.violations``.
Text that comes from the server's own environment (file paths, store URLs) is replaced
before it can reach a client; the server log keeps the detail.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bliss.errors import BlissError, InvalidInputError

# Ids and names quoted in a message; the whole message; one violation's description.
MAX_QUOTED_CHARS = 64
MAX_MESSAGE_CHARS = 1000
MAX_DESCRIPTION_CHARS = 200
# A message names at most this many items (and says how many more there are).
MAX_NAMED_ITEMS = 5

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
# An absolute path: a '/' (or '~/', 'C:\') that does not continue a word, URL or
# relative path, up to the next space or quote.
_PATH = re.compile(r"(?<![\w.~/\\-])(?:~|[A-Za-z]:)?[/\\][^\s'\"]+")


def shorten(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` cut to ``limit`` characters plus a marker saying how many were dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def redact_locations(text: str) -> str:
    """Replace URLs and absolute paths (the server's files, its store) in ``text``."""
    return _PATH.sub("<path>", _URL.sub("<url>", text))


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: ``items[3].embedding``, ``options.k``, ..."""

    field: str
    description: str


class BadRequestError(InvalidInputError):
    """Invalid request fields; answered INVALID_ARGUMENT with a google.rpc.BadRequest."""

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


def describe_item(position: int, item_id: str) -> str:
    """How messages name an item: ``item 3 (id 'cam7/0012.jpg')``, its id shortened."""
    return f"item {position} (id {shorten(item_id)!r})" if item_id else f"item {position}"


def item_error(position: int, item_id: str, field: str, problem: str) -> BadRequestError:
    """``item 3 (id 'x'): problem``, with the violation ``items[3].<field>``."""
    return BadRequestError(
        f"{describe_item(position, item_id)}: {problem}",
        [FieldViolation(f"items[{position}].{field}", shorten(problem, MAX_DESCRIPTION_CHARS))],
    )


def items_error(
    positions: Sequence[int], ids: Sequence[str], field: str, problem: str
) -> BadRequestError:
    """One message for several items with the same problem, naming the first few."""
    named = positions[:MAX_NAMED_ITEMS]
    more = len(positions) - len(named)
    listed = ", ".join(describe_item(p, ids[p]) for p in named)
    description = shorten(problem, MAX_DESCRIPTION_CHARS)
    return BadRequestError(
        f"{listed}{f' and {more} more' if more else ''}: {problem}",
        [FieldViolation(f"items[{p}].{field}", description) for p in named],
    )


def with_prefix(error: BlissError, prefix: str) -> BlissError:
    """The same error, its message prefixed (``stream message 2: ...``), details kept."""
    if isinstance(error, BadRequestError):
        return BadRequestError(f"{prefix}: {error}", error.violations)
    return type(error)(f"{prefix}: {error}")


def error_status(code: grpc.StatusCode, message: str, error: BaseException | None) -> grpc.Status:
    """The status to abort with: code, capped message, BadRequest details when known."""
    status = status_pb2.Status(code=code.value[0], message=shorten(message, MAX_MESSAGE_CHARS))
    violations = getattr(error, "violations", ())
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in violations[:MAX_NAMED_ITEMS]
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    return rpc_status.to_status(status)
