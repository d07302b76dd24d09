"""``bliss index extend``: a new version from a finished one plus new entries and/or images.

Only the new work is done: the base version's FAISS index is read and the new entries are
added to it (no retraining); each class's stored moments absorb its new normal images
(Chan's merge, exact); in table mode the statistics of new entries are computed from the
moments, and those of a class with new images are recomputed for every entry (t x D^2,
no pass over the images), while the other classes keep the base version's values. The
result equals a from-scratch build of the union (to rounding) and follows the same
fingerprint, resumption and activation rules as ``bliss index build``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
from tqdm import tqdm

from bliss.checksums import file_sha256
from bliss.class_statistics import ClassMoments, moment_statistics
from bliss.dictionary_index import DictionaryIndex, IndexKind, IndexOptions, extended_index
from bliss.embedding_bundle import EmbeddingExtension
from bliss.errors import InvalidInputError
from bliss.indexer.build_options import BuildOptions, BuildOutcome, ModelIdentity
from bliss.indexer.build_run import BuildRun
from bliss.indexer.executors import Executor
from bliss.indexer.pipeline import build_version
from bliss.indexer.workspace import BuildWorkspace
from bliss.npy_files import DEFAULT_CHUNK_BYTES, NpyRows, iter_row_chunks
from bliss.serving_artifacts import (
    MappedEntryStatistics,
    MappedEntryTexts,
    artifacts_directory,
    mapped_vectors,
)
from bliss.store import ClassRecord, Store, VersionRecord, VersionState

logger = logging.getLogger(__name__)

_TEXT_BLOCK = 65_536


class ExtensionInputs:
    """The inputs of an extension: the base version's files plus an extension folder."""

    def __init__(
        self, store: Store, data_dir: Path, base: VersionRecord, extension: EmbeddingExtension
    ) -> None:
        if base.state is VersionState.BUILDING:
            raise InvalidInputError(f"{base.label} is still building: finish it before extending")
        if base.artifacts_checksum is None:
            raise InvalidInputError(
                f"{base.label} was built before serving artifacts existed: rebuild it, then extend"
            )
        self.base = base
        self.extension = extension
        self.base_classes = store.load_classes(base.id)
        faiss_file = data_dir / base.faiss_path
        self.base_faiss_file = faiss_file
        self.base_artifacts = artifacts_directory(faiss_file)
        kind = IndexKind(base.faiss_kind)
        self.base_index = DictionaryIndex.load(
            faiss_file,
            kind,
            exact_vectors=mapped_vectors(self.base_artifacts) if kind is IndexKind.IVFPQ else None,
        )
        self._new_rows = self._rows_not_in_base()

    @property
    def class_names(self) -> list[str]:
        return [record.name for record in self.base_classes]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.base.build_fingerprint.encode())
        for path in self.extension.files():
            digest.update(path.name.encode())
            digest.update(file_sha256(path).encode())
        return digest.hexdigest()

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def class_sizes(self) -> list[int]:
        return [
            record.sample_count + len(self.extension.normal.get(record.name, ()))
            for record in self.base_classes
        ]

    def new_images(self, position: int) -> np.ndarray:
        name = self.base_classes[position].name
        return self.extension.normal.get(name, np.zeros((0, self.embedding_dim), np.float32))

    def dictionary_size(self, workspace: BuildWorkspace) -> int:
        return self.base.dictionary_size + len(self._new_rows)

    def dictionary_texts(self, workspace: BuildWorkspace) -> Iterator[str]:
        yield from self._base_texts()
        for row in self._new_rows:
            yield self.extension.dictionary_texts[row]

    def dictionary_file(self, workspace: BuildWorkspace) -> Path:
        """The union's embeddings: the base version's exact vectors, then the new ones."""
        # The base version and the extension are part of the build's identity.
        produced_by = {"base": self.base.id, "added": len(self._new_rows)}
        if not workspace.reusable("dictionary.npy", produced_by):
            size = self.dictionary_size(workspace)
            rows = max(1, DEFAULT_CHUNK_BYTES // (4 * self.embedding_dim))
            shape = (self.embedding_dim,)
            with workspace.npy_writer("dictionary.npy", size, shape, produced_by) as writer:
                for start in range(0, self.base.dictionary_size, rows):
                    stop = min(start + rows, self.base.dictionary_size)
                    writer.write(self.base_index.vectors_at(np.arange(start, stop)))
                writer.write(self.extension.dictionary[self._new_rows])
        return workspace.path("dictionary.npy")

    def label_embeddings(self, workspace: BuildWorkspace) -> np.ndarray:
        return np.stack([record.label_embedding for record in self.base_classes])

    def class_embeddings_file(self, workspace: BuildWorkspace, position: int) -> Path:
        output = f"normals/class_{position:05d}.npy"
        if not workspace.reusable(output, {"base": self.base.id}):
            workspace.save_array(self.new_images(position), output, {"base": self.base.id})
        return workspace.path(output)

    def release_encoder(self) -> None:
        """Extensions bring embeddings: there is no model to release."""

    def _base_texts(self) -> Iterator[str]:
        texts = MappedEntryTexts(self.base_artifacts)
        for start in range(0, self.base.dictionary_size, _TEXT_BLOCK):
            stop = min(start + _TEXT_BLOCK, self.base.dictionary_size)
            yield from texts.texts(np.arange(start, stop))

    def _rows_not_in_base(self) -> np.ndarray:
        """Rows of the extension's dictionary whose text the base does not have yet."""
        wanted = {text: row for row, text in enumerate(self.extension.dictionary_texts)}
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        known = [wanted[text] for text in self._base_texts() if text in wanted]
        if known:
            logger.info("%d added entries are already in %s: skipped", len(known), self.base.label)
        return np.setdiff1d(np.array(sorted(wanted.values())), np.array(known, dtype=np.int64))


class ExtensionRun(BuildRun):
    """BuildRun whose FAISS and statistics stages reuse the base version's work."""

    inputs: ExtensionInputs

    def _faiss_index(
        self, version: VersionRecord, dictionary_file: Path, normal_files: list[Path]
    ) -> DictionaryIndex:
        """The base version's index plus the new rows (its search parameters are kept)."""
        base = self.inputs.base
        added = version.dictionary_size - base.dictionary_size
        with tqdm(total=added, desc="add to index", unit="entry") as bar:
            return extended_index(
                self.inputs.base_faiss_file,
                IndexKind(base.faiss_kind),
                _rows_from(dictionary_file, base.dictionary_size),
                on_progress=bar.update,
            )

    def _class_statistics(
        self, dictionary_file: Path, normal_files: list[Path], labels: np.ndarray
    ) -> list[ClassRecord]:
        base_statistics = (
            MappedEntryStatistics(self.inputs.base_artifacts) if self._table_mode else None
        )
        classes = self.inputs.base_classes
        with tqdm(total=len(classes), desc="class statistics", unit="class") as bar:
            for position, record in enumerate(classes):
                if not self._class_done(position):
                    arrays = self._merged_class(record, np.load(normal_files[position]), labels)
                    if base_statistics is not None:
                        arrays |= self._entry_statistics(
                            position, record, arrays, dictionary_file, base_statistics
                        )
                    self._save_class_statistics(position, arrays)
                bar.update()
        return self._class_records(labels)

    def _merged_class(
        self, record: ClassRecord, new: np.ndarray, labels: np.ndarray
    ) -> dict[str, np.ndarray]:
        moments = record.moments.merge(ClassMoments.of(new))
        label_mean, label_std = record.label_mean, record.label_std
        if len(new):
            label = moment_statistics(moments, labels[record.position][None, :])
            label_mean, label_std = float(label.mean[0]), float(label.std[0])
        # The numpy scalars among them are saved (np.savez) as 0-d arrays like the rest.
        merged: dict[str, np.ndarray | np.generic] = {
            "label_mean": np.float64(label_mean),
            "label_std": np.float64(label_std),
            "count": np.int64(moments.count),
            "moment_mean": moments.mean,
            "moment_covariance": moments.covariance,
            "held_out": np.zeros((0, moments.dim), dtype=np.float32),
            "path": np.array("moments"),
            "new_images": np.int64(len(new)),
        }
        return cast(dict[str, np.ndarray], merged)

    def _entry_statistics(
        self,
        position: int,
        record: ClassRecord,
        arrays: dict[str, np.ndarray],
        dictionary_file: Path,
        base: MappedEntryStatistics,
    ) -> dict[str, np.ndarray]:
        """Eq. 8 of every entry: recomputed if the class changed, else base + new entries."""
        moments = ClassMoments.from_covariance(
            int(arrays["count"]), arrays["moment_mean"], arrays["moment_covariance"]
        )
        dictionary = NpyRows(dictionary_file)
        if int(arrays["new_images"]):
            stats = moment_statistics(moments, dictionary)
            return {"entry_mean": stats.mean, "entry_std": stats.std}
        first_new = self.inputs.base.dictionary_size
        added = moment_statistics(moments, dictionary[first_new:])
        return {
            "entry_mean": np.concatenate([base.mean[:, position], added.mean]),
            "entry_std": np.concatenate([base.std[:, position], added.std]),
        }


def _rows_from(path: Path, first: int) -> Iterator[np.ndarray]:
    """Rows ``first:`` of an .npy file, chunk by chunk."""
    for start, rows in iter_row_chunks(path):
        if start + len(rows) > first:
            yield np.ascontiguousarray(rows[max(0, first - start) :], dtype=np.float32)


def extend_version(
    store: Store,
    data_dir: Path,
    base: VersionRecord,
    extension: EmbeddingExtension,
    *,
    activate: bool = False,
    keep_workspace: bool = False,
    executor: Executor | None = None,
    wait: bool = False,
    rebuild: bool = False,
) -> BuildOutcome:
    """Build (or resume, or find) the version ``base`` + ``extension``.

    ``wait`` and ``rebuild`` are :func:`build_version`'s.
    """
    inputs = ExtensionInputs(store, data_dir, base, extension)
    options = BuildOptions(
        name=base.name,
        model=ModelIdentity(base.model_name, base.model_weights, base.model_checksum),
        dictionary_source=f"{base.dictionary_source} + extension:{extension.folder.resolve()}",
        prompt_template=base.prompt_template,
        index=IndexOptions(kind=IndexKind(base.faiss_kind)),
        statistics_mode=base.statistics_mode,
        default_k=base.default_k,
        default_lambda=base.default_lambda,
        eps=base.eps,
    )
    if store.load_calibration(base.id) is not None:
        logger.warning(
            "%s is calibrated, but its held-out images are not kept: the extended version "
            "has no normal_quantile; rebuild from all images to calibrate it",
            base.label,
        )
    return build_version(
        store,
        data_dir,
        inputs,
        options,
        activate=activate,
        keep_workspace=keep_workspace,
        executor=executor,
        run_type=ExtensionRun,
        parent=base,
        wait=wait,
        rebuild=rebuild,
    )
