"""Full verification of a version's files against the store (build, activation, verify).

Hashes the FAISS file and every serving artifact, checks the manifest against the
version's record, and compares a sample of the mapped texts and statistics with the store
rows, which stay the source of truth. Reads every byte: not for server start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError
from bliss.serving_artifacts import (
    MappedEntryStatistics,
    MappedEntryTexts,
    artifacts_directory,
    read_manifest,
    verify_artifacts,
)
from bliss.store import StatisticsMode, Store, VersionRecord

DEFAULT_SAMPLE = 1000


@dataclass(frozen=True)
class VerifiedVersion:
    label: str
    files: int  # files hashed
    bytes: int  # bytes hashed
    sampled_entries: int  # entries compared with the store


def verify_version(
    store: Store,
    version: VersionRecord,
    data_dir: Path,
    *,
    sample: int = DEFAULT_SAMPLE,
    hash_files: bool = True,
) -> VerifiedVersion:
    """Raise InvalidInputError/NotFoundError naming the first problem, else a summary.

    ``hash_files=False`` skips re-hashing files whose sha256 was computed as they were
    written (the build); the manifest, sizes and the store comparison are still checked.
    """
    if version.dictionary_store == "milvus":
        return _verify_milvus(version, sample)
    faiss_file = data_dir / version.faiss_path
    if version.artifacts_checksum is None:
        return _verify_faiss_only(version, faiss_file)
    directory = artifacts_directory(faiss_file)
    check = verify_artifacts if hash_files else read_manifest
    manifest = check(directory, faiss_file, version.artifacts_checksum)
    recorded = manifest.files.get(faiss_file.name, {}).get("sha256")
    if recorded != version.faiss_checksum:
        raise InvalidInputError(
            f"{directory} was written for another FAISS file than {version.label}'s: "
            "rebuild the version"
        )
    classes = store.load_classes(version.id)
    if (manifest.dictionary_size, manifest.classes) != (version.dictionary_size, len(classes)):
        raise InvalidInputError(
            f"{directory} holds {manifest.dictionary_size} entries x {manifest.classes} classes, "
            f"{version.label} has {version.dictionary_size} x {len(classes)}: rebuild the version"
        )
    ids = _sample_ids(version.dictionary_size, sample)
    _compare_texts(store, version, directory, ids)
    if version.statistics_mode is StatisticsMode.TABLE:
        _compare_statistics(store, version, directory, ids, len(classes))
    return VerifiedVersion(
        version.label,
        files=len(manifest.files),
        bytes=sum(int(entry["bytes"]) for entry in manifest.files.values()),
        sampled_entries=len(ids),
    )


def _verify_milvus(version: VersionRecord, sample: int) -> VerifiedVersion:
    """The collection exists, holds every entry, and sampled entries have a text and a
    unit-norm vector (Milvus keeps no checksum to compare)."""
    from bliss.milvus_dictionary import MilvusDictionary, MilvusDictionaryOptions

    options = MilvusDictionaryOptions.from_json(version.dictionary_options or "{}")
    collection = MilvusDictionary(options, version.embedding_dim, version.dictionary_size)
    rows = collection.row_count()
    if rows != version.dictionary_size:
        raise InvalidInputError(
            f"Milvus collection {options.collection} holds {rows} entries, {version.label} "
            f"has {version.dictionary_size}: rebuild the version"
        )
    ids = _sample_ids(version.dictionary_size, sample)
    norms = np.linalg.norm(collection.vectors_at(ids).astype(np.float64), axis=1)
    texts = collection.texts(ids)
    if not np.allclose(norms, 1.0, atol=1e-4) or not all(texts):
        raise InvalidInputError(
            f"Milvus collection {options.collection} has entries without a text or a unit "
            f"vector: rebuild {version.label}"
        )
    return VerifiedVersion(version.label, files=0, bytes=0, sampled_entries=len(ids))


def _verify_faiss_only(version: VersionRecord, faiss_file: Path) -> VerifiedVersion:
    actual = file_sha256(faiss_file)
    if actual != version.faiss_checksum:
        raise InvalidInputError(
            f"FAISS file {faiss_file} has sha256 {actual[:12]}..., {version.label} expects "
            f"{str(version.faiss_checksum)[:12]}...: the file was changed; rebuild the version"
        )
    return VerifiedVersion(version.label, 1, faiss_file.stat().st_size, 0)


def _sample_ids(size: int, sample: int) -> np.ndarray:
    """A seeded sample of positions that always includes the first and the last entry."""
    picked = np.random.default_rng(0).choice(size, size=min(size, sample), replace=False)
    return np.unique(np.concatenate([picked, [0, size - 1]])).astype(np.int64)


def _compare_texts(store: Store, version: VersionRecord, directory: Path, ids: np.ndarray) -> None:
    mapped = MappedEntryTexts(directory).texts(ids)
    stored = store.entry_texts(version.id, ids)
    for position, mapped_text, stored_text in zip(ids.tolist(), mapped, stored, strict=True):
        if mapped_text != stored_text:
            raise InvalidInputError(
                f"{directory}: entry {position} reads {mapped_text!r}, the store has "
                f"{stored_text!r}; rebuild the version"
            )


def _compare_statistics(
    store: Store, version: VersionRecord, directory: Path, ids: np.ndarray, classes: int
) -> None:
    mapped_mean, mapped_std = MappedEntryStatistics(directory).gather(ids[None, :])
    stored_mean, stored_std = store.entry_statistics(version.id, ids, classes)
    for what, mapped, stored in (
        ("mean", mapped_mean[0], stored_mean),
        ("std", mapped_std[0], stored_std),
    ):
        differs = mapped != stored
        if differs.any():
            row, column = np.argwhere(differs)[0]
            raise InvalidInputError(
                f"{directory}: eq. 8 {what} of class {row} at entry {ids[column]} differs from "
                "the store; rebuild the version"
            )
