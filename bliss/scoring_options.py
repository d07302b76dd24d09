"""The options of a scoring request, one type for the client that sends them and the
server that reads them, and the one mapping between :class:`ScoringMode` and the proto's
enum. Light (protobuf and :mod:`bliss.scoring`), so the client-only install can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bliss.errors import InvalidInputError
from bliss.scoring import ScoringMode
from bliss.v1 import scorer_pb2

PROTO_MODES: dict[ScoringMode, scorer_pb2.ScoringMode] = {
    ScoringMode.BLISS: scorer_pb2.SCORING_MODE_BLISS,
    ScoringMode.IC: scorer_pb2.SCORING_MODE_IC,
    ScoringMode.IC_RAW: scorer_pb2.SCORING_MODE_IC_RAW,
}
# A request that leaves the mode unset (proto3's zero value) asks for the full score.
_MODES_FROM_PROTO = {proto: mode for mode, proto in PROTO_MODES.items()}
_MODES_FROM_PROTO[scorer_pb2.SCORING_MODE_UNSPECIFIED] = ScoringMode.BLISS


def mode_from_proto(value: int) -> ScoringMode | None:
    """The mode of a proto enum value; None for a value this version does not know."""
    return _MODES_FROM_PROTO.get(value)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ScoringOptions:
    """How to score one request; None for ``k`` or ``lam``: the version's default."""

    index: str = ""  # empty: the only index the server serves
    mode: ScoringMode = ScoringMode.BLISS
    k: int | None = None
    lam: float | None = None
    class_scores: bool = False
    top_entries: bool = True

    def effective_k(self, default_k: int) -> int:
        """The K the scorer will use, given the version's default."""
        return default_k if self.k is None else self.k

    def to_proto(self) -> scorer_pb2.ScoreOptions:
        options = scorer_pb2.ScoreOptions(
            index=self.index,
            mode=PROTO_MODES[self.mode],
            return_class_scores=self.class_scores,
            return_top_entries=self.top_entries,
        )
        if self.k is not None:
            if self.k < 1:
                raise InvalidInputError(f"K must be at least 1, got {self.k}")
            options.k = self.k
        if self.lam is not None:
            options.lambda_weight = self.lam
        return options
