"""The build's working folder: where stage outputs wait until the version is ready.

A killed build resumes from what its workspace holds, so nothing in it may be trusted
blindly. Every output carries a *record* (``records/<output>.json``) of what produced
it - its inputs' checksums, chunk boundaries, the options that change it - and its own
checksum and row count. A resumed stage reuses an output only when its record equals
what the stage would produce now and the file still has that checksum; anything else is
redone. Files are written to a temporary name and renamed into place, and the record is
written after the file, so a crash between the two leaves an output that is redone.

The same records mark stages whose output lives outside the workspace (the FAISS file,
the store's rows): ``mark`` after the stage, ``matches`` before redoing it.

A workspace made by another build, another version or an older bliss (no or another
``workspace.json``) cannot be trusted as a whole: :meth:`BuildWorkspace.open` discards it
with one line saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError
from bliss.npy_files import NpyWriter, npy_layout

logger = logging.getLogger(__name__)

# Bump when the meaning of workspace files changes: older workspaces are then discarded.
WORKSPACE_FORMAT = 2
_IDENTITY = "workspace.json"

Provenance = Mapping[str, Any]  # what produced an output: JSON-serialisable values


class BuildWorkspace:
    """``<data_dir>/builds/<name>/<fingerprint prefix>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: dict[str, str] = {}  # output -> checksum, checked in this run

    @classmethod
    def for_build(cls, data_dir: Path, name: str, fingerprint: str) -> BuildWorkspace:
        return cls(data_dir / "builds" / name / fingerprint[:16])

    def open(self, fingerprint: str) -> BuildWorkspace:
        """Claim the folder for the build ``fingerprint``, discarding an untrusted one.

        Outputs inside depend only on the build's inputs; records of stages that wrote
        to the store also name the version they wrote to.
        """
        identity = {"format": WORKSPACE_FORMAT, "build": fingerprint}
        found = self._identity()
        if found is not None and found != identity:
            logger.warning(
                "discarding workspace %s: %s; this build starts over",
                self.root,
                _mismatch(found, identity),
            )
            shutil.rmtree(self.root)
        elif found is None and self.root.is_dir():
            logger.warning(
                "discarding workspace %s: it has no %s (written by an older bliss, or "
                "damaged); this build starts over",
                self.root,
                _IDENTITY,
            )
            shutil.rmtree(self.root)
        if found != identity:
            self._write_json(identity, _IDENTITY)
        return self

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ------------------------------------------------------------------ outputs

    def reusable(self, output: str, produced_by: Provenance, *, rows: int | None = None) -> bool:
        """Whether ``output`` exists, was produced by ``produced_by`` and is intact (with
        ``rows`` rows, when given: an .npy file).

        A stale or damaged output (and its record) is removed, with one line saying why.
        """
        if output in self._verified:
            verified = self._record(output)
            assert verified is not None, "a verified output has its record"
            return verified["produced_by"] == _normal(produced_by)
        record = self._record(output)
        file = self.path(output)
        if record is None:
            file.unlink(missing_ok=True)  # written, then killed before its record
            return False
        why = None
        if record["produced_by"] != _normal(produced_by):
            why = "it was produced by other inputs or options"
        elif not file.is_file() or file_sha256(file) != record["sha256"]:
            why = "it is missing or its checksum changed"
        elif rows is not None and npy_layout(file)[0][0] != rows:
            why = f"it has {npy_layout(file)[0][0]} rows where {rows} are expected"
        elif record["rows"] is not None and npy_layout(file)[0][0] != record["rows"]:
            why = "its row count changed"
        if why is not None:
            logger.info("redoing %s: %s", output, why)
            self.discard(output)
            return False
        self._verified[output] = record["sha256"]
        return True

    def checksum(self, output: str) -> str:
        """The recorded sha256 of an output that :meth:`reusable` accepted or this run wrote."""
        return self._verified[output]

    def identity_of(self, file: Path) -> str:
        """A checksum-like identity of a stage's input file, inside the workspace or not.

        Files outside it are the build's own inputs, whose content the build fingerprint
        already covers; their path, size and modification time say enough.
        """
        try:
            return self.checksum(file.relative_to(self.root).as_posix())
        except ValueError:
            stat = file.stat()
            return digest(file, stat.st_size, stat.st_mtime_ns)

    def save_array(self, array: np.ndarray, output: str, produced_by: Provenance) -> Path:
        target = self.path(output)
        with _atomic_target(target) as temporary, open(temporary, "wb") as stream:
            np.save(stream, array)
        self._finish(output, produced_by, rows=len(array) if array.ndim else None)
        return target

    def save_arrays(
        self, arrays: dict[str, np.ndarray], output: str, produced_by: Provenance
    ) -> Path:
        target = self.path(output)
        with _atomic_target(target) as temporary, open(temporary, "wb") as stream:
            # numpy types savez(**kwds) as arrays, but mypy also matches a str-keyed dict
            # against its allow_pickle: bool keyword; the keys here are array names.
            np.savez(stream, **arrays)  # type: ignore[arg-type]
        self._finish(output, produced_by, rows=None)
        return target

    def save_lines(self, lines: Iterator[str], output: str, produced_by: Provenance) -> int:
        count = 0
        target = self.path(output)
        with _atomic_target(target) as temporary, open(temporary, "w", encoding="utf-8") as stream:
            for line in lines:
                stream.write(line + "\n")
                count += 1
        self._finish(output, produced_by, rows=None)
        return count

    @contextmanager
    def npy_writer(
        self, output: str, rows: int, row_shape: tuple[int, ...], produced_by: Provenance
    ) -> Iterator[NpyWriter]:
        """An :class:`NpyWriter` whose file gets its record once every row is written."""
        with NpyWriter(self.path(output), rows, row_shape, "<f4") as writer:
            yield writer
        self._finish(output, produced_by, rows=rows, checksum=writer.checksum)

    def load_array(self, output: str, *, mmap: bool = False) -> np.ndarray:
        return np.load(self.path(output), mmap_mode="r" if mmap else None, allow_pickle=False)

    def load_arrays(self, output: str) -> dict[str, np.ndarray]:
        with np.load(self.path(output), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    def iter_lines(self, output: str) -> Iterator[str]:
        with open(self.path(output), encoding="utf-8") as stream:
            for line in stream:
                yield line.rstrip("\n")

    def discard(self, output: str) -> None:
        self._verified.pop(output, None)
        self._record_path(output).unlink(missing_ok=True)
        self.path(output).unlink(missing_ok=True)

    # ------------------------------------------- stages whose output is elsewhere

    def matches(self, stage: str, produced_by: Provenance) -> bool:
        """Whether ``stage`` was marked done by the same inputs and options."""
        record = self._record(stage)
        return record is not None and record["produced_by"] == _normal(produced_by)

    def mark(self, stage: str, produced_by: Provenance, **facts: Any) -> None:
        """Record that ``stage`` is done (``facts``: what later runs need to know of it)."""
        self._write_json(
            {"produced_by": _normal(produced_by), **_normal(facts)}, "records", stage + ".json"
        )

    def facts(self, stage: str) -> dict[str, Any]:
        record = self._record(stage)
        if record is None:
            raise InvalidInputError(f"stage {stage!r} of {self.root} has no record")
        return record

    def unmark(self, stage: str) -> None:
        self._record_path(stage).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        # Drop the per-name folder too once its last build is gone.
        for parent in (self.root.parent, self.root.parent.parent):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()

    # ------------------------------------------------------------------ private

    def _finish(
        self, output: str, produced_by: Provenance, *, rows: int | None, checksum: str = ""
    ) -> None:
        checksum = checksum or file_sha256(self.path(output))
        self._write_json(
            {"produced_by": _normal(produced_by), "sha256": checksum, "rows": rows},
            "records",
            output + ".json",
        )
        self._verified[output] = checksum

    def _record(self, output: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(output).read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def _record_path(self, output: str) -> Path:
        return self.path("records", output + ".json")

    def _identity(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(_IDENTITY).read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def _write_json(self, value: Mapping[str, Any], *parts: str) -> None:
        with _atomic_target(self.path(*parts)) as temporary:
            temporary.write_text(json.dumps(value, sort_keys=True), "utf-8")


def digest(*parts: object) -> str:
    """sha256 of values joined unambiguously: a compact identity for lists of inputs."""
    hasher = hashlib.sha256()
    for part in parts:
        encoded = str(part).encode("utf-8", "surrogatepass")
        hasher.update(len(encoded).to_bytes(8, "little") + encoded)
    return hasher.hexdigest()


def _normal(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back from JSON, so records compare equal after a round trip."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    if found.get("format") != wanted["format"]:
        return f"it has format {found.get('format')}, this bliss writes {wanted['format']}"
    return "it belongs to another build"


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
