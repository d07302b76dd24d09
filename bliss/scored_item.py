"""One scored input as callers see it, and its JSON-lines form.

``bliss score --local``, the gRPC server and ``bliss score --server`` all produce these,
so local and remote scoring print exactly the same lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from bliss.scorer import Scorer
from bliss.scoring import ScoreBatch


@dataclass(frozen=True)
class TopEntry:
    text: str
    similarity: float


@dataclass(frozen=True)
class ScoredItem:
    id: str
    index_version: str
    score: float
    internal_class_score: float
    external_text_score: float
    nearest_class: str
    top_entries: tuple[TopEntry, ...] = ()
    class_scores: dict[str, float] | None = None
    normal_quantile: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "index_version": self.index_version,
            "score": self.score,
            "internal_class_score": self.internal_class_score,
            "external_text_score": self.external_text_score,
            "nearest_class": self.nearest_class,
            "top_entries": [{"text": e.text, "similarity": e.similarity} for e in self.top_entries],
        }
        if self.class_scores is not None:
            record["class_scores"] = self.class_scores
        if self.normal_quantile is not None:
            record["normal_quantile"] = self.normal_quantile
        return record


def scored_items(
    batch: ScoreBatch,
    scorer: Scorer,
    ids: list[str],
    *,
    class_scores: bool = False,
) -> list[ScoredItem]:
    """Name the classes and entries of a score batch, one item per input, in order."""
    names = scorer.classes.names
    texts = scorer.entry_texts(batch.top_entry_ids)
    items = []
    for row, item_id in enumerate(ids):
        items.append(
            ScoredItem(
                id=item_id,
                index_version=scorer.label,
                score=float(batch.score[row]),
                internal_class_score=float(batch.internal_class_score[row]),
                external_text_score=float(batch.external_text_score[row]),
                nearest_class=names[int(batch.nearest_class[row])],
                top_entries=tuple(
                    TopEntry(text, float(similarity))
                    for text, similarity in zip(
                        texts[row], batch.top_entry_similarities[row], strict=True
                    )
                ),
                class_scores=(
                    dict(zip(names, map(float, batch.class_scores[row]), strict=True))
                    if class_scores
                    else None
                ),
                normal_quantile=(
                    None if batch.normal_quantile is None else float(batch.normal_quantile[row])
                ),
            )
        )
    return items


def write_json_lines(items: Iterable[ScoredItem], stream: IO[str]) -> None:
    for item in items:
        stream.write(json.dumps(item.to_json_dict(), ensure_ascii=False) + "\n")
