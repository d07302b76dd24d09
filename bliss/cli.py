"""The ``bliss`` command: one entry point, one sub-command per component.

This module and ``bliss.quickstart`` are the application layer: the only modules of the
``bliss`` package that reach into the indexer, the server and the client. Each
component's ``commands.py`` adds its sub-commands; heavy libraries (torch, open_clip,
faiss) are imported only by the command that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import select
import sys
from collections.abc import Iterator
from typing import Any

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

# Import names of the `server` extra's packages (pyproject.toml). The command line shares
# them with the server and the indexer, so a client-only install cannot run it.
SERVER_STACK_MODULES = frozenset(
    {
        "alembic",
        "grpc_reflection",
        "huggingface_hub",
        "open_clip",
        "PIL",
        "prometheus_client",
        "pydantic",
        "pydantic_core",
        "pydantic_settings",
        "safetensors",
        "sqlalchemy",
        "threadpoolctl",
        "torch",
        "torchvision",
        "tqdm",
    }
)
INSTALL_SERVER = "pip install 'bliss-anomaly[cpu]' (or 'bliss-anomaly[gpu]' for CUDA 12 GPUs)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bliss",
        description="BLISS anomaly scoring: index builds, a gRPC scoring service and its client.",
    )
    parser.add_argument("--version", action="version", version=f"bliss {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and other libraries' INFO"
    )
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(verbose=args.verbose, quiet=args.quiet)
        with _progress_bars_hidden() if args.quiet else contextlib.nullcontext():
            code = args.handler(args)
            # Flushed here, where a reader that has gone (`| head`) is still caught below.
            sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # As Python's signal docs advise for SIGPIPE: stdout goes to devnull, so that the
        # interpreter's last flush at exit does not fail on the closed pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except ModuleNotFoundError as error:
        hint = _install_hint(error)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 2
    except BlissError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _install_hint(error: ModuleNotFoundError) -> str | None:
    """What to install for a missing package of an extra; None for anything else (a
    missing submodule of an installed package is a bug, not an install to make)."""
    package = error.name
    if package == "faiss":
        return f"no FAISS is installed: {INSTALL_SERVER}"
    if package == "psycopg":
        return "a PostgreSQL store needs psycopg: pip install 'bliss-anomaly[postgres]'"
    if package in SERVER_STACK_MODULES:
        return (
            f"{package} is not installed: the bliss command needs the server install, "
            f"{INSTALL_SERVER}"
        )
    return None


class _OtherLibrariesFrom(logging.Filter):
    """Passes bliss's own records, and other libraries' from ``level`` up: open_clip alone
    logs a dozen INFO lines per model load, which tell a bliss user nothing."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "bliss" or record.name.startswith("bliss.")
        return own or record.levelno >= self.level


def _configure_logging(*, verbose: bool, quiet: bool) -> None:
    """Logs go to stderr (stdout is the commands' output, JSON for some): bliss's INFO and
    up; with -v its DEBUG and other libraries' INFO; with -q warnings and errors only."""
    # The root logger keeps the level of bliss's records, not a stricter one: Ray tasks
    # collect what they log at the driver's root level, and this handler sorts it here.
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_OtherLibrariesFrom(logging.INFO if verbose else logging.WARNING))
    logging.basicConfig(level=level, handlers=[handler])


@contextlib.contextmanager
def _progress_bars_hidden() -> Iterator[None]:
    """No tqdm progress bar until the end (bliss draws all of its bars with tqdm)."""
    from tqdm import std

    # Some bars pass disable= themselves, which tqdm's own TQDM_DISABLE variable does not
    # override: the constructor is wrapped instead, and restored after (tests call main()
    # in-process).
    saved_init = vars(std.tqdm)["__init__"]
    init = std.tqdm.__init__

    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        std.tqdm.__init__ = saved_init


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it, rather than the broken pipe
    being another one (a socket, a worker's pipe), which stays an error."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # stdout is no file (redirected in-process), so not the broken pipe
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
