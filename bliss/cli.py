"""The ``bliss`` command: one entry point, one sub-command per component.

This module and ``bliss.quickstart`` are the application layer: the only modules of the
``bliss`` package that reach into the indexer, the server and the client. Each
component's ``commands.py`` adds its sub-commands; heavy libraries (torch, open_clip,
faiss) are imported only by the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bliss import __version__
from bliss.errors import BlissError

COMMAND_MODULES = (
    "bliss.quickstart",
    "bliss.indexer.commands",
    "bliss.client.commands",
    "bliss.server.commands",
    "bliss.store.commands",
    "bliss.evaluation.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bliss",
        description="BLISS anomaly scoring: index builds, a gRPC scoring service and its client.",
    )
    parser.add_argument("--version", action="version", version=f"bliss {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # faiss reports at INFO which CPU build it loaded, Alembic every plugin and revision
    # it runs: the commands say what they did themselves.
    for chatty in ("faiss", "alembic"):
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    try:
        return args.handler(args)
    except BlissError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
