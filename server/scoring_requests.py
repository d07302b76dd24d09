"""Protobuf requests to validated arrays, and score batches to protobuf responses.

Validation happens before any expensive work (image decoding, encoding, FAISS) and every
message names the item at fault: ``item 3 (id 'cam7/0012.jpg')``, with a field violation
(``items[3].embedding``) for the client. The scoring itself is
:meth:`bliss.scorer.Scorer.score`; nothing here computes a score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
from google.protobuf.message import DecodeError, Message

from bliss.scorer import Scorer
from bliss.scoring import ScoreBatch
from bliss.scoring_options import ScoringOptions, mode_from_proto
from bliss.server.error_details import (
    BadRequestError,
    FieldViolation,
    describe_item,
    item_error,
    items_error,
    shorten,
)
from bliss.server.request_limits import (
    ENTRY_TEXT_MAX_BYTES,
    MIN_EMBEDDING_NORM,
    check_k,
    check_lambda,
    clip_entry_text,
    tiny_rows,
)
from bliss.server.status_codes import BatchTooLargeError
from bliss.v1 import scorer_pb2

_FLOAT32_LE = np.dtype("<f4")
# A text of at most this many characters is within ENTRY_TEXT_MAX_BYTES whatever they are.
_UNCLIPPED_CHARS = ENTRY_TEXT_MAX_BYTES // 4

MessageT = TypeVar("MessageT", bound=Message)


def parse_message(raw: bytes, message_type: type[MessageT]) -> MessageT:
    """The request message from its wire bytes; malformed bytes are the caller's fault."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        name = message_type.DESCRIPTOR.full_name
        raise BadRequestError(
            f"the request is not a valid {name} message ({len(raw):,} bytes that do not parse "
            f"as protobuf): build it from proto/{message_type.DESCRIPTOR.file.name}"
        ) from None


@dataclass
class ParsedItems:
    """A request's items: embedding rows filled in, image rows waiting for the encoder."""

    ids: list[str]
    embeddings: np.ndarray  # float32 [B, D]
    image_positions: list[int]
    images: list[bytes]


def parse_options(options: scorer_pb2.ScoreOptions, scorer: Scorer, max_k: int) -> ScoringOptions:
    mode = mode_from_proto(options.mode)
    if mode is None:
        raise BadRequestError(
            f"unknown scoring mode {options.mode}: use SCORING_MODE_BLISS, SCORING_MODE_IC or "
            "SCORING_MODE_IC_RAW",
            [FieldViolation("options.mode", "must be a ScoringMode value")],
        )
    k = options.k if options.HasField("k") else None
    if k is not None:
        check_k(k, scorer, max_k)
    elif scorer.defaults.k > min(max_k, scorer.dictionary_size):
        raise BadRequestError(
            f"the default K={scorer.defaults.k} of {scorer.label} exceeds its dictionary size "
            f"({scorer.dictionary_size} entries) or the server's limit of {max_k} (--max-k): "
            "set K in the request",
            [FieldViolation("options.k", "must be set: the version's default is out of range")],
        )
    lam = options.lambda_weight if options.HasField("lambda_weight") else None
    if lam is not None:
        check_lambda(lam)
    return ScoringOptions(
        index=options.index,
        mode=mode,
        k=k,
        lam=lam,
        class_scores=options.return_class_scores,
        top_entries=options.return_top_entries,
    )


def parse_items(items: list[scorer_pb2.Item], dim: int, label: str, max_items: int) -> ParsedItems:
    """Check sizes and dimensions; decode embedding bytes; unusable rows are refused."""
    if not items:
        raise BadRequestError(
            "the request has no items: send at least one image or embedding",
            [FieldViolation("items", "must not be empty")],
        )
    if len(items) > max_items:
        raise BatchTooLargeError(
            f"the request has {len(items)} items, over the server's limit of {max_items} "
            "(--max-batch-items): split it into smaller requests"
        )
    ids: list[str] = []
    embedding_positions: list[int] = []
    values: list[bytes] = []
    image_positions: list[int] = []
    images: list[bytes] = []
    expected_bytes = dim * _FLOAT32_LE.itemsize
    for position, item in enumerate(items):
        ids.append(item.id)
        kind = item.WhichOneof("input")
        if kind == "embedding":
            embedding = item.embedding
            if embedding.dim != dim or len(embedding.values) != expected_bytes:
                raise item_error(
                    position,
                    item.id,
                    "embedding",
                    f"{_embedding_shape_problem(embedding)}; index {shorten(label)} takes "
                    f"{dim}-dimensional float32 embeddings ({expected_bytes} bytes, little-endian)",
                )
            embedding_positions.append(position)
            values.append(embedding.values)
        elif kind == "image":
            image_positions.append(position)
            images.append(item.image)
        else:
            raise BadRequestError(
                f"{describe_item(position, item.id)} has neither an image nor an embedding",
                [FieldViolation(f"items[{position}].input", "set image or embedding")],
            )
    embeddings = np.zeros((len(items), dim), dtype=np.float32)
    if values:
        rows = np.frombuffer(b"".join(values), dtype=_FLOAT32_LE).reshape(len(values), dim)
        _reject_unusable_rows(rows, embedding_positions, ids)
        if len(values) == len(items):
            embeddings = rows.astype(np.float32, copy=False)
        else:
            embeddings[embedding_positions] = rows
    return ParsedItems(ids, embeddings, image_positions, images)


def _embedding_shape_problem(embedding: scorer_pb2.Embedding) -> str:
    size = len(embedding.values)
    if size % _FLOAT32_LE.itemsize:
        return f"embedding.values has {size} bytes, not a whole number of float32 values"
    if size // _FLOAT32_LE.itemsize != embedding.dim:
        values = size // _FLOAT32_LE.itemsize
        return (
            f"embedding.values holds {values} float32 values but embedding.dim is {embedding.dim}"
        )
    return f"the embedding has dimension {embedding.dim}"


def _reject_unusable_rows(rows: np.ndarray, positions: list[int], ids: list[str]) -> None:
    finite = np.isfinite(rows).all(axis=1)
    _reject(~finite, positions, ids, "NaN or infinite values in the embedding")
    # One flag per row; numpy's stubs also allow a scalar for any(axis=...).
    zero = ~cast(np.ndarray, rows.any(axis=1))
    _reject(zero, positions, ids, "the embedding is all zeros (it has no direction to compare)")
    _reject(
        tiny_rows(rows),
        positions,
        ids,
        f"the embedding's L2 norm is below {MIN_EMBEDDING_NORM:g} (too small to have a "
        "reliable direction): send the model's unnormalised or normalised output",
    )


def _reject(bad: np.ndarray, positions: list[int], ids: list[str], problem: str) -> None:
    if bad.any():
        raise items_error([positions[r] for r in np.flatnonzero(bad)], ids, "embedding", problem)


def build_response(
    batch: ScoreBatch, scorer: Scorer, ids: list[str], options: ScoringOptions
) -> scorer_pb2.ScoreResponse:
    """One ScoreResult per item, in order (plain loops over lists: protobuf's fast path)."""
    response = scorer_pb2.ScoreResponse()
    names = scorer.classes.names
    label = scorer.label
    nearest = [names[i] for i in batch.nearest_class.tolist()]
    quantiles = None if batch.normal_quantile is None else batch.normal_quantile.tolist()
    class_scores = batch.class_scores.tolist() if options.class_scores else None
    if options.class_scores:
        response.class_names.extend(names)
    texts = scorer.entry_texts(batch.top_entry_ids) if options.top_entries else None
    similarities = batch.top_entry_similarities.tolist() if options.top_entries else None
    results = response.results
    for row, (item_id, score, internal, external) in enumerate(
        zip(
            ids,
            batch.score.tolist(),
            batch.internal_class_score.tolist(),
            batch.external_text_score.tolist(),
            strict=True,
        )
    ):
        result = results.add()
        result.id = item_id
        result.score = score
        result.internal_class_score = internal
        result.external_text_score = external
        result.nearest_class = nearest[row]
        result.index_version = label
        if class_scores is not None:
            result.class_scores.extend(class_scores[row])
        if texts is not None and similarities is not None:
            entries = result.top_entries
            for text, similarity in zip(texts[row], similarities[row], strict=True):
                entry = entries.add()
                entry.text = text if len(text) <= _UNCLIPPED_CHARS else clip_entry_text(text)
                entry.similarity = similarity
        if quantiles is not None:
            result.normal_quantile = quantiles[row]
    return response
