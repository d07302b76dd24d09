"""The stages of one build, from encoded inputs to a ready version.

Each stage reads what the earlier ones left in the build's workspace and records what it
derived its output from (``indexer.workspace``), so that a resumed build redoes exactly
the stages whose inputs changed: dictionary embeddings -> normal embeddings -> FAISS
index or Milvus collection (-> recall tuning) -> class statistics -> store rows ->
serving artifacts -> (score change) -> (calibration) -> ready.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import cast

import numpy as np
from tqdm import tqdm

from bliss.calibration import Calibration
from bliss.dictionary_index import DictionaryIndex, IndexKind, build_index
from bliss.encoders import format_prompt
from bliss.errors import InvalidInputError
from bliss.indexer.build_checks import check_index_fit
from bliss.indexer.build_inputs import BuildInputs
from bliss.indexer.build_options import BuildOptions
from bliss.indexer.class_statistics_task import ClassStatisticsTask, run_class_statistics
from bliss.indexer.executors import Executor
from bliss.indexer.milvus_build import MILVUS_STAGE, write_milvus_collection
from bliss.indexer.workspace import BuildWorkspace, digest
from bliss.npy_files import NpyRows, npy_layout
from bliss.recall_tuning import (
    ExactSearch,
    SearchTuning,
    default_nlist,
    exact_neighbours,
    sample_queries,
    tune_search,
)
from bliss.scoring import ScoringMode
from bliss.serving_artifacts import MANIFEST, ArtifactsWriter, artifacts_directory
from bliss.store import ClassRecord, StatisticsMode, Store, VersionRecord
from bliss.version_check import verify_version
from bliss.version_loader import load_scorer

logger = logging.getLogger(__name__)

# Statistics rows (classes x entries) per store transaction: large enough that COPY and
# executemany run at full speed, small enough that a killed build loses little.
STATISTICS_BLOCK_ROWS = 1_000_000
TUNING_FILE = "search_tuning.json"


class BuildRun:
    """The stages of one build; ``bliss index extend`` overrides how two of them work."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        inputs: BuildInputs,
        options: BuildOptions,
        workspace: BuildWorkspace,
        executor: Executor,
    ) -> None:
        self.executor = executor
        self.store = store
        self.data_dir = data_dir
        self.inputs = inputs
        self.options = options
        self.workspace = workspace
        self.stage_seconds: dict[str, float] = {}
        # What the store-side stages derive from: each records it, plus its own inputs,
        # and is redone when a resumed run finds it changed.
        self._lineage: dict[str, object] = {}
        self._class_provenance: list[dict[str, object]] = []

    def create_version(self, fingerprint: str, parent: VersionRecord | None) -> VersionRecord:
        options = self.options
        with self._stage("dictionary entries"):
            size = self.inputs.dictionary_size(self.workspace)
        if options.default_k > size:
            raise InvalidInputError(
                f"--default-k {options.default_k} is larger than the dictionary ({size} "
                "entries): every request at the default K would fail; lower --default-k"
            )
        check_index_fit(options.index, size, self.inputs.embedding_dim)
        version = self.store.create_version(
            name=options.name,
            model_name=options.model.name,
            model_weights=options.model.weights,
            model_checksum=options.model.checksum,
            embedding_dim=self.inputs.embedding_dim,
            prompt_template=options.prompt_template,
            dictionary_source=options.dictionary_source,
            dictionary_size=size,
            faiss_path="",
            faiss_kind=options.index.kind.value,
            default_k=options.default_k,
            default_lambda=options.default_lambda,
            eps=options.eps,
            build_fingerprint=fingerprint,
            statistics_mode=options.statistics_mode,
            parent_version_id=None if parent is None else parent.id,
        )
        logger.info(
            "building %s (%d dictionary entries) in %s", version.label, size, self.workspace.root
        )
        return version

    def run(self, version: VersionRecord) -> VersionRecord:
        with self._stage("dictionary embeddings"):
            dictionary_file = self.inputs.dictionary_file(self.workspace)
        rows = npy_layout(dictionary_file)[0][0]
        if rows != version.dictionary_size:
            raise InvalidInputError(
                f"the dictionary has {rows} embeddings for {version.dictionary_size} entries: "
                f"remove the build's workspace {self.workspace.root} and run the build again"
            )
        with self._stage("normal embeddings"):
            normal_files = [
                self.inputs.class_embeddings_file(self.workspace, position)
                for position in range(len(self.inputs.class_names))
            ]
            labels = self.inputs.label_embeddings(self.workspace)
        self.inputs.release_encoder()
        self._lineage = {
            "version": version.id,
            "dictionary": self.workspace.identity_of(dictionary_file),
        }
        if self.options.dictionary_store is None:
            with self._stage("faiss index"):
                self._write_faiss(version, dictionary_file, normal_files)
        else:
            with self._stage(MILVUS_STAGE):
                self._lineage["milvus"] = write_milvus_collection(
                    self.executor, self.store, self.workspace, version,
                    self.options.dictionary_store, self.inputs.dictionary_texts(self.workspace),
                    dictionary_file, self._lineage,
                )  # fmt: skip
        self._class_provenance = [
            self._statistics_provenance(normal_file, labels[position])
            for position, normal_file in enumerate(normal_files)
        ]
        with self._stage("class statistics"):
            records = self._class_statistics(dictionary_file, normal_files, labels)
        with self._stage("store rows"):
            self._write_store(version, self.inputs.dictionary_texts(self.workspace), records)
        if self.options.dictionary_store is None:  # Milvus holds texts and vectors itself
            with self._stage("serving artifacts"):
                self._write_artifacts(version, dictionary_file, len(records))
        if self.options.target_recall is not None:
            with self._stage("score change"):
                self._record_tuning(version, dictionary_file)
        if self.options.calibration_fraction > 0:
            with self._stage("calibration"):
                self._calibrate(version)
        version = self.store.mark_ready(version.id)
        logger.info("%s is ready", version.label)
        return version

    def _write_faiss(
        self, version: VersionRecord, dictionary_file: Path, normal_files: list[Path]
    ) -> None:
        relative = Path("indexes") / self.options.name / f"v{version.version}.faiss"
        target = self.data_dir / relative
        produced_by = self._faiss_provenance()
        if self.workspace.matches("faiss", produced_by) and target.is_file():
            logger.info("FAISS index %s already written", target)
        else:
            index = self._faiss_index(version, dictionary_file, normal_files)
            checksum = index.save(target)
            self.store.set_faiss_file(
                version.id, path=str(relative), kind=index.kind.value, checksum=checksum
            )
            self.workspace.mark("faiss", produced_by, sha256=checksum)
        self._lineage["faiss"] = self.workspace.facts("faiss")["sha256"]

    def _faiss_provenance(self) -> dict[str, object]:
        return {
            **self._lineage,
            "index": asdict(self.options.index),
            "target_recall": self.options.target_recall,
        }

    def _faiss_index(
        self, version: VersionRecord, dictionary_file: Path, normal_files: list[Path]
    ) -> DictionaryIndex:
        """The version's index, trained and filled (and tuned to --target-recall)."""
        options = self.options.index
        if self.options.target_recall is not None and options.nlist is None:
            options = replace(options, nlist=default_nlist(version.dictionary_size))
        with tqdm(total=version.dictionary_size, desc="index dictionary", unit="entry") as bar:
            index = build_index(dictionary_file, options, on_progress=bar.update)
        if self.options.target_recall is not None:
            self._tune(index, dictionary_file, normal_files)
        return index

    def _tune(
        self, index: DictionaryIndex, dictionary_file: Path, normal_files: list[Path]
    ) -> None:
        """Set the search parameter to the target recall, measured on the normal images."""
        queries = self._tuning_queries(normal_files)
        k = self.options.default_k
        target = float(self.options.target_recall or 0.0)
        exact = exact_neighbours(NpyRows(dictionary_file), queries, k)
        if index.kind is IndexKind.IVFPQ:  # measure what is served: exact re-ranking
            index.exact_vectors = np.load(dictionary_file, mmap_mode="r")
        tuning = tune_search(
            index.index, index.kind, queries, exact, k, target,
            search=lambda batch, hits: index.search(batch, hits)[1],
        )  # fmt: skip
        index.exact_vectors = None
        logger.log(
            logging.INFO if tuning.reached else logging.WARNING,
            "%s %s=%d: recall@%d %.4f on %d normal images (target %.4f%s)",
            index.kind.value, tuning.parameter, tuning.value, k, tuning.recall, len(queries),
            target, "" if tuning.reached else ": NOT reached; use a larger --nlist, --pq-m or flat",
        )  # fmt: skip
        self.workspace.save_lines(
            iter([json.dumps(asdict(tuning))]), TUNING_FILE, self._faiss_provenance()
        )

    def _tuning_queries(self, normal_files: list[Path]) -> np.ndarray:
        normal = np.concatenate([np.load(path, mmap_mode="r") for path in normal_files])
        return sample_queries(normal)

    def _record_tuning(self, version: VersionRecord, dictionary_file: Path) -> None:
        """The largest BLISS score change that approximate search causes, recorded."""
        produced_by = {**self._lineage, "stage": "score change"}
        if self.workspace.matches("score change", produced_by):
            return
        version = self.store.get_version_by_id(version.id)
        tuning = SearchTuning(**json.loads(next(self.workspace.iter_lines(TUNING_FILE))))
        scorer = load_scorer(self.store, version, self.data_dir)
        # --target-recall is for FAISS versions only, whose scorer searches a DictionaryIndex.
        reference = cast(DictionaryIndex, scorer.index)
        exact = scorer.with_index(ExactSearch(NpyRows(dictionary_file), reference))
        queries = self._tuning_queries(
            [self.inputs.class_embeddings_file(self.workspace, position)
             for position in range(len(self.inputs.class_names))]
        )  # fmt: skip
        change = np.abs(scorer.score(queries).score - exact.score(queries).score).max()
        self.store.set_search_tuning(version.id, replace(tuning, max_score_change=float(change)))
        self.workspace.mark("score change", produced_by)
        logger.info("approximate search changes BLISS scores by at most %.3g", change)

    def _class_statistics(
        self, dictionary_file: Path, normal_files: list[Path], labels: np.ndarray
    ) -> list[ClassRecord]:
        names = self.inputs.class_names
        dim = npy_layout(dictionary_file)[0][1]
        _check_dimension("class prompt embeddings", labels, dim)
        tasks = []
        for position, normal_file in enumerate(normal_files):
            normal = np.load(normal_file, mmap_mode="r")
            _check_dimension(f"normal embeddings of {names[position]!r}", normal, dim)
            if not self._class_done(position):
                tasks.append(
                    ClassStatisticsTask(
                        position=position,
                        label_embedding=np.asarray(labels[position], dtype=np.float32),
                        dictionary_file=dictionary_file,
                        normal_file=normal_file,
                        calibration_fraction=self.options.calibration_fraction,
                        path=self.options.statistics_path,
                        entry_statistics=self._table_mode,
                    )
                )
        done = len(names) - len(tasks)
        results = self.executor.map(run_class_statistics, tasks)
        with tqdm(total=len(names), initial=done, desc="class statistics", unit="class") as bar:
            for task, arrays in zip(tasks, results, strict=True):
                logger.debug("class %d: %s path", task.position, arrays["path"])
                self._save_class_statistics(task.position, arrays)
                bar.update()
        return self._class_records(labels)

    def _statistics_provenance(self, normal_file: Path, label: np.ndarray) -> dict[str, object]:
        """What a class's statistics depend on (both statistics paths are exact, but
        their float rounding differs: a resumed build must not mix them)."""
        return {
            "dictionary": self._lineage["dictionary"],
            "normal": self.workspace.identity_of(normal_file),
            "label": hashlib.sha256(np.asarray(label, dtype="<f4").tobytes()).hexdigest(),
            "calibration_fraction": self.options.calibration_fraction,
            "path": self.options.statistics_path.value,
            "mode": self.options.statistics_mode.value,
        }

    def _class_outputs(self, position: int) -> list[str]:
        """A class's workspace files, the .npz (written last) at the end."""
        entries = [_entry_file(position, kind) for kind in ("mean", "std")]
        return [*(entries if self._table_mode else []), _statistics_file(position)]

    def _class_done(self, position: int) -> bool:
        produced_by = self._class_provenance[position]
        return all(
            self.workspace.reusable(file, produced_by) for file in self._class_outputs(position)
        )

    def _save_class_statistics(self, position: int, arrays: dict[str, np.ndarray]) -> None:
        """A class's workspace files; the .npz, written last, marks the class done."""
        produced_by = self._class_provenance[position]
        # The per-entry arrays are memory-mapped later, block by block.
        for kind in ("mean", "std") if self._table_mode else ():
            entry_values = arrays.pop(f"entry_{kind}")
            self.workspace.save_array(entry_values, _entry_file(position, kind), produced_by)
        self.workspace.save_arrays(arrays, _statistics_file(position), produced_by)

    def _class_records(self, labels: np.ndarray) -> list[ClassRecord]:
        return [
            self._class_record(position, name, labels[position])
            for position, name in enumerate(self.inputs.class_names)
        ]

    def _class_record(self, position: int, name: str, label: np.ndarray) -> ClassRecord:
        arrays = self.workspace.load_arrays(_statistics_file(position))
        return ClassRecord(
            position=position,
            name=name,
            prompt=format_prompt(self.options.prompt_template, name),
            label_embedding=np.asarray(label, dtype=np.float32),
            label_mean=float(arrays["label_mean"]),
            label_std=float(arrays["label_std"]),
            sample_count=int(arrays["count"]),
            moment_mean=arrays["moment_mean"],
            moment_covariance=arrays["moment_covariance"],
        )

    def _write_store(
        self, version: VersionRecord, texts: Iterator[str], records: list[ClassRecord]
    ) -> None:
        store = self.store
        self._lineage["classes"] = digest(
            *(
                self.workspace.checksum(file)
                for p in range(len(records))
                for file in self._class_outputs(p)
            )
        )
        # Marked before the first write: the rows already in the store count as done
        # only when the same statistics produced them.
        produced_by = {**self._lineage, "stage": "store rows"}
        resuming = self.workspace.matches("store rows", produced_by)
        self.workspace.mark("store rows", produced_by)
        in_milvus = self.options.dictionary_store is not None  # texts are in the collection
        if not in_milvus and (
            not resuming or store.count_entries(version.id) != version.dictionary_size
        ):
            store.write_entries(version.id, texts)
        store.write_classes(version.id, records)
        if self._table_mode:
            self._write_entry_statistics(version, records, resuming)

    def _write_entry_statistics(
        self, version: VersionRecord, records: list[ClassRecord], resuming: bool
    ) -> None:
        store = self.store
        entries = version.dictionary_size
        block = max(1, STATISTICS_BLOCK_ROWS // len(records))
        # Blocks are written in order, one transaction each: the rows present say where
        # a killed build stopped. Each block replaces the rows it covers.
        done = store.count_entry_statistics(version.id) // len(records) if resuming else 0
        means, stds = self._entry_columns(len(records))
        with tqdm(total=entries, initial=done, desc="store statistics", unit="entry") as bar:
            for start in range(done - done % block, entries, block):
                stop = min(start + block, entries)
                store.write_entry_statistics(
                    version.id,
                    start,
                    np.stack([mean[start:stop] for mean in means]),
                    np.stack([std[start:stop] for std in stds]),
                )
                bar.update(stop - max(start, done))

    def _entry_columns(self, classes: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each class's eq. 8 mean and std columns ([t] each), memory-mapped."""
        return tuple(  # type: ignore[return-value]
            [
                self.workspace.load_array(_entry_file(position, kind), mmap=True)
                for position in range(classes)
            ]
            for kind in ("mean", "std")
        )

    def _write_artifacts(self, version: VersionRecord, dictionary_file: Path, classes: int) -> None:
        """The columnar snapshot the server maps, from the same arrays as the store rows."""
        version = self.store.get_version_by_id(version.id)
        faiss_file = self.data_dir / version.faiss_path
        directory = artifacts_directory(faiss_file)
        produced_by = {**self._lineage, "stage": "serving artifacts"}
        if (
            self.workspace.matches("serving artifacts", produced_by)
            and (directory / MANIFEST).is_file()
        ):
            logger.info("serving artifacts %s already written", directory)
            return
        writer = ArtifactsWriter(directory, version.dictionary_size, classes)
        writer.write_texts(self.inputs.dictionary_texts(self.workspace))
        if self._table_mode:
            writer.write_statistics(*self._entry_columns(classes))
        if not self.options.index.kind.stores_exact_vectors:
            writer.write_vectors(dictionary_file)
        assert version.faiss_checksum is not None, "the faiss stage recorded the file's checksum"
        self.store.set_artifacts(version.id, writer.finish(faiss_file, version.faiss_checksum))
        self.workspace.mark("serving artifacts", produced_by)
        version = self.store.get_version_by_id(version.id)
        # Every file was hashed as it was written: compare the snapshot with the store.
        checked = verify_version(self.store, version, self.data_dir, hash_files=False)
        logger.info(
            "serving artifacts written to %s and checked (%d files, %.1f MiB; %d entries "
            "compared with the store)",
            directory,
            checked.files,
            checked.bytes / 2**20,
            checked.sampled_entries,
        )

    @property
    def _table_mode(self) -> bool:
        return self.options.statistics_mode is StatisticsMode.TABLE

    def _calibrate(self, version: VersionRecord) -> None:
        """Score the held-out normal images in every mode; store their sorted scores."""
        produced_by = {**self._lineage, "stage": "calibration"}
        if self.workspace.matches("calibration", produced_by):
            return
        held_out = np.concatenate(
            [
                self.workspace.load_arrays(_statistics_file(position))["held_out"]
                for position in range(len(self.inputs.class_names))
            ]
        )
        scorer = load_scorer(self.store, self.store.get_version_by_id(version.id), self.data_dir)
        options = self.options
        calibration = Calibration(
            k=options.default_k,
            lam=options.default_lambda,
            sorted_scores={
                mode: np.sort(scorer.score(held_out, mode=mode).score) for mode in ScoringMode
            },
        )
        self.store.write_calibration(version.id, calibration)
        self.workspace.mark("calibration", produced_by)
        logger.info("calibrated on %d held-out normal images", len(held_out))

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - started


def _statistics_file(position: int) -> str:
    """Written last for a class: its presence means the class's statistics are done."""
    return f"statistics/class_{position:05d}.npz"


def _entry_file(position: int, kind: str) -> str:
    return f"statistics/class_{position:05d}.entry_{kind}.npy"


def _check_dimension(what: str, embeddings: np.ndarray, dim: int) -> None:
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise InvalidInputError(
            f"{what} have shape {embeddings.shape}, the dictionary dimension is {dim}"
        )
