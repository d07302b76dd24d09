"""mypy runs clean over the whole project, with the config in pyproject.toml ([tool.mypy]).

The installed package `bliss` is assembled from several folders (pyproject.toml,
[tool.setuptools.package-dir]): bliss/ itself, and server/, indexer/, client/, migrations/
and proto/bliss/v1/ as bliss.server, bliss.indexer, bliss.client, bliss.migrations and
bliss.v1. mypy cannot follow the editable install's import hook, so the test lays the
package out as it is installed, a tree of symlinks under .mypy_cache/, and checks it with
`mypy -p bliss` from there: every module under its real name, imports resolved the same way
as at run time. Its cache lives beside it, so a rerun checks only what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Installed subpackage -> the folder it comes from (pyproject.toml, package-dir).
SUBPACKAGES = {
    "server": "server",
    "indexer": "indexer",
    "client": "client",
    "migrations": "migrations",
    "v1": "proto/bliss/v1",
}


def _package_tree(cache_dir: Path) -> Path:
    """Lay out `bliss` as installed, as symlinks to the sources; returns the tree's root."""
    tree = cache_dir / "package-tree"
    package = tree / "bliss"
    # Rebuilt every run (cheap: links only), so new or removed files are picked up. The
    # links' paths stay the same, so mypy's cache for them stays valid.
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for entry in (ROOT / "bliss").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in SUBPACKAGES.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return tree


def _run_mypy(tree: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(cache_dir / "cache"),
            "-p",
            "bliss",
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPYPATH": ""},
    )


def _readable(output: str) -> str:
    """mypy names files by their path in the tree; name the source folder instead."""
    for name, folder in SUBPACKAGES.items():
        output = output.replace(f"bliss/{name}/", f"{folder}/")
    return output


def test_mypy_reports_no_errors():
    # mypy is in the dev extra: without it, `python -m mypy` fails and says so below.
    cache_dir = ROOT / ".mypy_cache" / "type-check-test"
    tree = _package_tree(cache_dir)
    result = _run_mypy(tree, cache_dir)
    output = _readable(result.stdout + result.stderr)
    assert result.returncode == 0, f"mypy found errors:\n{output}"
    # Every part of the package was checked, not just bliss/.
    assert "Success: no issues found" in output, output
