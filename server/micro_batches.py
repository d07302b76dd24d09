"""One request scored in micro-batches of rows, and its response put back together.

Each micro-batch is scored and turned into its part of the response on a scoring thread
(the FAISS search, the statistics gather and the protobuf building all grow with rows),
as one task of the request's lane in the :class:`~bliss.server.fair_scheduler.FairScheduler`,
so other requests take turns with a huge one. Rows are independent at every stage
(search, gather, eqs. 5-11, calibration), so the parts, concatenated in order, are the
response to the whole batch; the tests compare them with unsplit scoring.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from bliss.errors import BlissError, StoreError
from bliss.scoring_options import ScoringOptions
from bliss.server.request_limits import non_finite_error, non_finite_rows
from bliss.server.scoring_requests import ParsedItems, build_response
from bliss.server.status_codes import IndexReadError, store_failure
from bliss.v1 import scorer_pb2

if TYPE_CHECKING:
    from bliss.server.index_registry import ServedIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredPart:
    """The response to some rows, or the positions (in the request) that were not finite."""

    response: scorer_pb2.ScoreResponse | None
    non_finite: list[int]


def row_slices(count: int, size: int) -> list[slice]:
    """``count`` rows ``size`` at a time (0: all at once)."""
    step = size or count
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def score_rows(
    served: ServedIndex,
    parsed: ParsedItems,
    options: ScoringOptions,
    rows: slice,
    store_url: str,
) -> ScoredPart:
    """Score ``rows`` of a validated request (a scoring-pool task)."""
    try:
        batch = served.scorer.score(
            parsed.embeddings[rows], mode=options.mode, k=options.k, lam=options.lam
        )
        bad = non_finite_rows(batch)
        if bad:
            return ScoredPart(None, [rows.start + row for row in bad])
        return ScoredPart(build_response(batch, served.scorer, parsed.ids[rows], options), [])
    except StoreError:
        raise
    except SQLAlchemyError as error:
        # A store error the store did not translate (a corrupt SQLite page): one line.
        raise store_failure(error, store_url) from None
    except BlissError as error:
        # The request was validated already: this is the version's files or rows
        # failing (a missing entry, a corrupt file), which the client cannot fix.
        reference = secrets.token_hex(4)
        logger.warning("scoring on %s failed (reference %s): %s", served.label, reference, error)
        raise IndexReadError(
            f"index {served.label} could not be read while scoring (reference {reference}: "
            "the server log has the details)"
        ) from None


def merge_parts(parts: list[ScoredPart], ids: list[str], label: str) -> scorer_pb2.ScoreResponse:
    """The parts' responses as one, in order; NonFiniteScoreError naming every bad item
    (in request order, whichever part found it)."""
    bad = [position for part in parts for position in part.non_finite]
    if bad:
        raise non_finite_error(bad, ids, label)
    responses = [part.response for part in parts if part.response is not None]
    merged = responses[0]
    for response in responses[1:]:
        del response.class_names[:]  # the first part has them
        merged.MergeFrom(response)
    return merged
