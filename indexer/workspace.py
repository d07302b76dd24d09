"""The build's working folder: where stage outputs wait until the version is ready.

Every file is written to a temporary name and renamed into place, so a file that exists
is complete; a killed build resumes from whatever files exist.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class BuildWorkspace:
    """``<data_dir>/builds/<name>/<fingerprint prefix>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_build(cls, data_dir: Path, name: str, fingerprint: str) -> BuildWorkspace:
        return cls(data_dir / "builds" / name / fingerprint[:16])

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def has(self, *parts: str) -> bool:
        return self.path(*parts).exists()

    def save_array(self, array: np.ndarray, *parts: str) -> Path:
        target = self.path(*parts)
        with _atomic_target(target) as temporary, open(temporary, "wb") as stream:
            np.save(stream, array)
        return target

    def save_arrays(self, arrays: dict[str, np.ndarray], *parts: str) -> Path:
        target = self.path(*parts)
        with _atomic_target(target) as temporary, open(temporary, "wb") as stream:
            np.savez(stream, **arrays)
        return target

    def save_lines(self, lines: Iterator[str], *parts: str) -> int:
        target = self.path(*parts)
        count = 0
        with _atomic_target(target) as temporary, open(temporary, "w", encoding="utf-8") as stream:
            for line in lines:
                stream.write(line + "\n")
                count += 1
        return count

    def load_array(self, *parts: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.path(*parts), mmap_mode="r" if mmap else None, allow_pickle=False)

    def load_arrays(self, *parts: str) -> dict[str, np.ndarray]:
        with np.load(self.path(*parts), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    def iter_lines(self, *parts: str) -> Iterator[str]:
        with open(self.path(*parts), encoding="utf-8") as stream:
            for line in stream:
                yield line.rstrip("\n")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        # Drop the per-name folder too once its last build is gone.
        for parent in (self.root.parent, self.root.parent.parent):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()


@contextmanager
def _atomic_target(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
