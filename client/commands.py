"""``bliss score``: score images or embeddings, in-process (``--local``) or on a server;
``bliss health``: ask servers whether they are serving."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bliss.errors import InvalidInputError
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.client.connection import TlsConfig

TOKEN_ENVIRONMENT_VARIABLE = "BLISS_AUTH_TOKEN"
DEFAULT_DEADLINE_S = 60.0
HEALTH_DEADLINE_S = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    score = subparsers.add_parser(
        "score",
        help="score images or embeddings (one JSON line per input, in input order)",
        description="Writes one JSON line per input: id, index_version, score, "
        "internal_class_score, external_text_score, nearest_class, top_entries.",
    )
    where = score.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="score in this process from the store")
    where.add_argument(
        "--server",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="score on these servers (round-robin over several)",
    )
    score.add_argument(
        "--index", help="index name (required with --local; with --server when it serves several)"
    )
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
        help="hold statistics in memory up to this size, else read them per batch (--local)",
    )
    score.add_argument(
        "--device", help="torch device for --images (--local; default: cuda when present)"
    )
    score.add_argument(
        "--concurrency", type=int, default=4, help="batches in flight at once (--server)"
    )
    add_store_arguments(score)
    add_connection_arguments(score, deadline_s=DEFAULT_DEADLINE_S)
    score.set_defaults(handler=run_score)

    health = subparsers.add_parser(
        "health",
        help="check that servers are serving (exit 0 when every one is)",
        description="Asks each server for its grpc.health.v1 status, overall or of one "
        "index, and prints one line per server. Exit status 0 when all are SERVING, else 1.",
    )
    health.add_argument("--server", required=True, metavar="HOST:PORT[,HOST:PORT...]")
    health.add_argument("--index", default="", help="status of this index (default: the server)")
    add_connection_arguments(health, deadline_s=HEALTH_DEADLINE_S)
    health.set_defaults(handler=run_health)


def add_connection_arguments(parser: argparse.ArgumentParser, *, deadline_s: float) -> None:
    group = parser.add_argument_group("server connection (--server)")
    group.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-cert)")
    group.add_argument("--ca-cert", type=Path, help="PEM CA bundle to verify the servers with")
    group.add_argument("--client-cert", type=Path, help="PEM client certificate (mTLS)")
    group.add_argument("--client-key", type=Path, help="PEM key of --client-cert")
    group.add_argument("--tls-server-name", help="name to verify server certificates against")
    group.add_argument(
        "--token-file",
        type=Path,
        help=f"file with the bearer token (default: env {TOKEN_ENVIRONMENT_VARIABLE})",
    )
    group.add_argument(
        "--deadline-s", type=float, default=deadline_s, help="deadline of each call, seconds"
    )
    group.add_argument(
        "--retries", type=int, default=3, help="retries of a call that failed UNAVAILABLE (0-4)"
    )


def connection_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of BlissClient / AsyncBlissClient from the connection flags."""
    return {
        "tls": _tls_from_args(args),
        "token": _token_from_args(args),
        "timeout_s": args.deadline_s,
        "max_retries": args.retries,
    }


def _tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    from bliss.client.connection import TlsConfig

    wanted = args.tls or any(
        value is not None
        for value in (args.ca_cert, args.client_cert, args.client_key, args.tls_server_name)
    )
    if not wanted:
        return None
    return TlsConfig(
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        server_name=args.tls_server_name,
    )


def _token_from_args(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise InvalidInputError(f"cannot read --token-file {args.token_file}: {error}") from error
    if not token:
        raise InvalidInputError(f"--token-file {args.token_file} is empty")
    return token


def run_score(args: argparse.Namespace) -> int:
    if not args.embeddings and not args.images:
        raise InvalidInputError(
            "nothing to score: pass --embeddings FILE.npy and/or --images PATHS"
        )
    if args.server is not None:
        return _run_remote_score(args)
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


def _run_remote_score(args: argparse.Namespace) -> int:
    from bliss.client.async_client import AsyncBlissClient
    from bliss.client.remote_scoring import RemoteScoringRequest, score_remotely

    request = RemoteScoringRequest(
        index=args.index or "",
        embeddings=args.embeddings,
        images=tuple(args.images or ()),
        mode=args.mode,
        k=args.k,
        lam=args.lam,
        class_scores=args.class_scores,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )
    connection = connection_from_args(args)

    async def score() -> None:
        async with AsyncBlissClient(args.server, **connection) as client:
            with _output(args.output) as stream:
                await score_remotely(client, request, stream)

    asyncio.run(score())
    return 0


def run_health(args: argparse.Namespace) -> int:
    import grpc

    from bliss.client.connection import parse_servers
    from bliss.client.messages import ScoringServiceError
    from bliss.client.sync_client import BlissClient

    connection = connection_from_args(args)
    all_serving = True
    for address in parse_servers(args.server):
        # One client per server: through a shared round-robin channel the answer would
        # come from whichever server is next, not from the one asked about.
        with BlissClient(address, **connection) as client:
            try:
                status = client.health(args.index)
            except ScoringServiceError as error:
                unknown = error.code == grpc.StatusCode.NOT_FOUND
                status = "SERVICE_UNKNOWN" if unknown else f"UNREACHABLE ({error})"
        print(f"{address} {status}")
        all_serving = all_serving and status == "SERVING"
    return 0 if all_serving else 1


@contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "w", encoding="utf-8") as stream:
        yield stream
    temporary.replace(path)
