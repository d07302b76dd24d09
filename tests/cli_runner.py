"""Run the ``bliss`` command in-process and capture what it prints."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from bliss.cli import main


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, data_dir: Path, store_url: str | None = None) -> CliResult:
    argv = [str(a) for a in args] + ["--data-dir", str(data_dir)]
    if store_url is not None:
        argv += ["--store-url", store_url]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return CliResult(code, out.getvalue(), err.getvalue())
