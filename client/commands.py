"""``bliss score``: score images or embeddings, in-process (``--local``) or on a server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from bliss.errors import InvalidInputError
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    score = subparsers.add_parser(
        "score",
        help="score images or embeddings (one JSON line per input, in input order)",
        description="Writes one JSON line per input: id, index_version, score, "
        "internal_class_score, external_text_score, nearest_class, top_entries.",
    )
    where = score.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="score in this process from the store")
    score.add_argument("--index", help="index name (required with --local)")
    score.add_argument("--embeddings", type=Path, help=".npy file of float32 [B, D] embeddings")
    score.add_argument("--images", type=Path, nargs="+", metavar="PATH", help="image files")
    score.add_argument("--mode", default="bliss", choices=["bliss", "ic", "ic_raw"])
    score.add_argument(
        "--k", type=int, help="dictionary entries per image (default: the version's)"
    )
    score.add_argument("--lambda", dest="lam", type=float, help="weight of the external text score")
    score.add_argument("--class-scores", action="store_true", help="include per-class scores")
    score.add_argument("--output", type=Path, help="output file (default: standard output)")
    score.add_argument("--batch-size", type=int, default=256, help="inputs scored per batch")
    score.add_argument(
        "--memory-budget-mib",
        type=int,
        default=2048,
        help="hold statistics in memory up to this size, else read them per batch",
    )
    score.add_argument("--device", help="torch device for --images (default: cuda when present)")
    add_store_arguments(score)
    score.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    if not args.embeddings and not args.images:
        raise InvalidInputError(
            "nothing to score: pass --embeddings FILE.npy and/or --images PATHS"
        )
    if args.index is None:
        raise InvalidInputError("--local needs --index NAME (see `bliss index list`)")
    from bliss.local_scoring import LocalScoringRequest, score_locally

    request = LocalScoringRequest(
        index=args.index,
        embeddings=args.embeddings,
        images=tuple(args.images or ()),
        mode=args.mode,
        k=args.k,
        lam=args.lam,
        class_scores=args.class_scores,
        batch_size=args.batch_size,
        memory_budget_bytes=args.memory_budget_mib * 2**20,
        device=args.device,
    )
    settings = settings_from_args(StoreSettings, args)
    with _output(args.output) as stream:
        score_locally(settings, request, stream)
    return 0


@contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "w", encoding="utf-8") as stream:
        yield stream
    temporary.replace(path)
