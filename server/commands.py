"""``bliss serve``: run the gRPC scoring service until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from bliss.errors import InvalidInputError
from bliss.server.settings import ServerSettings, add_server_arguments
from bliss.settings import settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the active index versions over gRPC",
        description="Serves every active index version of the store over gRPC "
        "(bliss.v1.AnomalyScorer, grpc.health.v1, and reflection with --reflection) and picks "
        "up newly activated versions without dropping requests. Listens on 127.0.0.1 unless "
        "--host says otherwise. SIGTERM drains in-flight calls, then exits.",
    )
    add_server_arguments(serve)
    serve.set_defaults(handler=run_serve)


def load_server_settings(args: argparse.Namespace) -> ServerSettings:
    """Settings from flags and BLISS_* variables; a bad value names its flag and variable."""
    try:
        return settings_from_args(ServerSettings, args)
    except ValidationError as error:
        problems = "; ".join(_describe(problem) for problem in error.errors())
        raise InvalidInputError(f"bad server setting: {problems}") from None


def _describe(problem: ErrorDetails) -> str:
    field = str(problem["loc"][0]) if problem.get("loc") else ""
    message = problem["msg"]
    if not field:
        return message
    return f"--{field.replace('_', '-')} / BLISS_{field.upper()}: {message}"


def run_serve(args: argparse.Namespace) -> int:
    from bliss.server.log_format import use_log_format

    settings = load_server_settings(args)
    use_log_format(settings.log_format)
    # Imported after the log format is set: importing the store logs from alembic.
    from bliss.server.runtime import BlissServer, serve

    def announce(server: BlissServer) -> None:
        # One line on stdout that scripts (and tests starting port 0) can wait for.
        metrics = "off" if server.metrics_port is None else f"port {server.metrics_port}"
        print(
            f"bliss serve listening on {settings.host}:{server.port} (metrics: {metrics})",
            flush=True,
        )

    asyncio.run(serve(settings, on_started=announce))
    return 0
