"""Every request's budget, checked before any work: K, lambda, the response's size, and
that nothing non-finite leaves the server.

The response-size estimate is an upper bound on the serialised ScoreResponse: each
protobuf field costs its tag, a length varint of at most 5 bytes and its payload, and
every top-entry text is at most :data:`ENTRY_TEXT_MAX_BYTES` (longer dictionary texts
are clipped in responses, see :func:`clip_entry_text`). A request whose bound exceeds
the server's message limit is refused up front instead of failing after the scoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bliss.errors import InvalidInputError
from bliss.scorer import Scorer, ScoringDefaults
from bliss.scoring import MAX_LAMBDA, ScoreBatch
from bliss.server.error_details import (
    MAX_NAMED_ITEMS,
    BadRequestError,
    FieldViolation,
    describe_item,
    shorten,
)
from bliss.server.status_codes import NonFiniteScoreError
from bliss.serving_artifacts import MappedEntryTexts

# Embeddings are L2-normalised by the server; below this norm a vector is noise (or
# float32 underflow) with no meaningful direction.
MIN_EMBEDDING_NORM = 1e-6
# Dictionary texts longer than this (UTF-8 bytes) are clipped in responses, which is what
# lets the response size be bounded before scoring.
ENTRY_TEXT_MAX_BYTES = 1024
# Any protobuf field: its tag (1 byte for field numbers up to 15) and a length varint.
_FIELD_HEADER = 1 + 5
_DOUBLE_FIELD = 1 + 8


def check_lambda(lam: float) -> None:
    if not (math.isfinite(lam) and 0 <= lam <= MAX_LAMBDA):
        raise BadRequestError(
            f"lambda must be a finite number between 0 and {MAX_LAMBDA:g}, got {lam}",
            [FieldViolation("options.lambda_weight", f"must be in [0, {MAX_LAMBDA:g}]")],
        )


def check_k(k: int, scorer: Scorer, max_k: int) -> None:
    if k > max_k:
        raise BadRequestError(
            f"K={k} is over the server's limit of {max_k} (--max-k): ask for fewer "
            "dictionary entries per item",
            [FieldViolation("options.k", f"must be at most {max_k}")],
        )
    if not 1 <= k <= scorer.dictionary_size:
        raise BadRequestError(
            f"K={k} must be between 1 and the dictionary size of {scorer.label} "
            f"({scorer.dictionary_size} entries)",
            [FieldViolation("options.k", f"must be in [1, {scorer.dictionary_size}]")],
        )


def check_version_defaults(defaults: ScoringDefaults, label: str) -> None:
    """A version's stored K, lambda and eps must be usable before it is served."""
    problems = []
    if defaults.k < 1:
        problems.append(f"default K={defaults.k} is below 1")
    if not (math.isfinite(defaults.lam) and 0 <= defaults.lam <= MAX_LAMBDA):
        problems.append(f"default lambda={defaults.lam} is not in [0, {MAX_LAMBDA:g}]")
    if not (math.isfinite(defaults.eps) and defaults.eps > 0):
        problems.append(f"eps={defaults.eps} is not a positive finite number")
    if problems:
        raise InvalidInputError(
            f"{label} has unusable scoring defaults ({'; '.join(problems)}): rebuild it "
            "with --default-k / --default-lambda in range"
        )


def tiny_rows(rows: np.ndarray) -> np.ndarray:
    """Rows whose L2 norm is below MIN_EMBEDDING_NORM (computed in float64: no overflow)."""
    return np.linalg.norm(rows.astype(np.float64), axis=1) < MIN_EMBEDDING_NORM


def entry_text_bound(scorer: Scorer) -> int:
    """The longest top-entry text a response can carry, in UTF-8 bytes.

    Exact for versions with serving artifacts (their text offsets are at hand); the clip
    length otherwise, since reading every text from the store would cost a full scan.
    """
    source = scorer.entry_text_source
    if isinstance(source, MappedEntryTexts) and len(source.offsets) > 1:
        longest = int(np.diff(source.offsets).max())
        return min(longest, ENTRY_TEXT_MAX_BYTES)
    return ENTRY_TEXT_MAX_BYTES


def clip_entry_text(text: str) -> str:
    """``text`` within ENTRY_TEXT_MAX_BYTES of UTF-8, marked when it was clipped."""
    encoded = text.encode("utf-8")
    if len(encoded) <= ENTRY_TEXT_MAX_BYTES:
        return text
    # Room for the marker; cutting bytes may split a character, which is then dropped.
    kept = encoded[: ENTRY_TEXT_MAX_BYTES - 32].decode("utf-8", errors="ignore")
    return f"{kept}…(+{len(text) - len(kept)} chars)"


@dataclass(frozen=True)
class ResponseShape:
    """What a response will hold, known from the request before scoring."""

    ids: Sequence[str]
    k: int
    top_entries: bool
    class_scores: bool


def response_size_bound(shape: ResponseShape, scorer: Scorer, text_bound: int) -> int:
    """Bytes the serialised ScoreResponse can take at most."""
    names = [len(name.encode("utf-8")) for name in scorer.classes.names]
    per_result = (
        _FIELD_HEADER  # the ScoreResult itself
        + 3 * _DOUBLE_FIELD  # score, internal_class_score, external_text_score
        + _FIELD_HEADER
        + max(names, default=0)  # nearest_class
        + _FIELD_HEADER
        + len(scorer.label.encode("utf-8"))  # index_version
        + _DOUBLE_FIELD  # normal_quantile
        + _FIELD_HEADER  # id (its bytes are added per item below)
    )
    if shape.class_scores:
        per_result += _FIELD_HEADER + 8 * len(names)  # packed doubles
    if shape.top_entries:
        per_entry = _FIELD_HEADER + _FIELD_HEADER + text_bound + _DOUBLE_FIELD
        per_result += shape.k * per_entry
    total = len(shape.ids) * per_result + sum(len(i.encode("utf-8")) for i in shape.ids)
    if shape.class_scores:
        total += sum(_FIELD_HEADER + n for n in names)  # class_names
    return total


def check_response_size(
    shape: ResponseShape, scorer: Scorer, text_bound: int, max_bytes: int
) -> None:
    """Refuse a request whose response could exceed the message limit, saying what fits."""
    bound = response_size_bound(shape, scorer, text_bound)
    if bound <= max_bytes:
        return
    per_item = max(1, bound // len(shape.ids))
    fitting = max(0, max_bytes // per_item - 1)
    smaller = "lower K or leave return_top_entries off" if shape.top_entries else ""
    if not smaller and shape.class_scores:
        smaller = "leave return_class_scores off"
    if fitting:
        advice = f"split it into requests of at most {fitting} items"
        advice += f", or {smaller}" if smaller else ""
    else:
        advice = smaller or "raise --max-message-mib"
    mib = 2**20
    raise BadRequestError(
        f"the response to {len(shape.ids)} items (K={shape.k}"
        f"{', top entries' if shape.top_entries else ''}"
        f"{', class scores' if shape.class_scores else ''}) could take up to "
        f"{bound / mib:.1f} MiB, over the server's message limit of {max_bytes / mib:g} MiB "
        f"(--max-message-mib): {advice}",
        [
            FieldViolation("items", f"at most {fitting} items fit the response budget")
            if fitting
            else FieldViolation("options.k", "one item's response exceeds the budget")
        ],
    )


def non_finite_rows(batch: ScoreBatch) -> list[int]:
    """Rows of ``batch`` with a NaN or infinite output."""
    rows = ~(
        np.isfinite(batch.score)
        & np.isfinite(batch.internal_class_score)
        & np.isfinite(batch.external_text_score)
        & np.isfinite(batch.class_scores).all(axis=1)
        & np.isfinite(batch.top_entry_similarities).all(axis=1)
    )
    if batch.normal_quantile is not None:
        rows |= ~np.isfinite(batch.normal_quantile)
    return np.flatnonzero(rows).tolist()


def non_finite_error(bad: Sequence[int], ids: Sequence[str], label: str) -> NonFiniteScoreError:
    """The error naming the items at positions ``bad`` (of ``ids``), in request order."""
    named = ", ".join(describe_item(p, ids[p]) for p in bad[:MAX_NAMED_ITEMS])
    more = f" and {len(bad) - MAX_NAMED_ITEMS} more" if len(bad) > MAX_NAMED_ITEMS else ""
    return NonFiniteScoreError(
        f"{named}{more}: index {shorten(label)} produced a NaN or infinite score for valid "
        "input, so it was not returned; the index's statistics are likely corrupt: tell the "
        "operator (the server log names the index)"
    )
