"""The build pipeline: stages from inputs to a ready (and optionally active) index version.

A build is identified by a fingerprint of its inputs and options. Running it again finds
the version with that fingerprint: a finished one is left alone, an unfinished one
(state ``building``) resumes from the files its workspace already holds. Store writes
are one transaction per table (per class for the statistics), and the version only
becomes ``ready`` once every row is there, so the server never sees half a version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bliss.calibration import Calibration, holdout_split
from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexOptions, build_index
from bliss.encoders import format_prompt
from bliss.errors import InvalidInputError
from bliss.indexer.build_inputs import BuildInputs
from bliss.indexer.class_statistics_task import ClassStatisticsTask, run_class_statistics
from bliss.indexer.executors import Executor, LocalExecutor
from bliss.indexer.workspace import BuildWorkspace
from bliss.scoring import DEFAULT_EPS, DEFAULT_K, DEFAULT_LAMBDA, ScoringMode
from bliss.store import ClassRecord, Store, VersionRecord, VersionState
from bliss.version_loader import load_scorer

logger = logging.getLogger(__name__)

# Statistics rows (classes x entries) per store transaction: large enough that COPY and
# executemany run at full speed, small enough that a killed build loses little.
STATISTICS_BLOCK_ROWS = 1_000_000


@dataclass(frozen=True)
class ModelIdentity:
    """What the store records about the model that produced the embeddings."""

    name: str
    weights: str = ""
    checksum: str | None = None


@dataclass(frozen=True)
class BuildOptions:
    name: str
    model: ModelIdentity
    dictionary_source: str
    prompt_template: str
    index: IndexOptions = field(default_factory=IndexOptions)
    statistics_path: StatisticsPath = StatisticsPath.AUTO
    default_k: int = DEFAULT_K
    default_lambda: float = DEFAULT_LAMBDA
    eps: float = DEFAULT_EPS
    calibration_fraction: float = 0.0

    def fingerprint(self, inputs_fingerprint: str) -> str:
        """Everything that changes the result; the statistics path does not (both exact)."""
        identity = asdict(self)
        identity.pop("statistics_path")
        identity["inputs"] = inputs_fingerprint
        return hashlib.sha256(
            json.dumps(identity, sort_keys=True, default=str).encode()
        ).hexdigest()


@dataclass(frozen=True)
class BuildOutcome:
    version: VersionRecord
    built: bool  # False when an identical finished version already existed
    stage_seconds: dict[str, float]


def build_version(
    store: Store,
    data_dir: Path,
    inputs: BuildInputs,
    options: BuildOptions,
    *,
    activate: bool = False,
    keep_workspace: bool = False,
    executor: Executor | None = None,
) -> BuildOutcome:
    """Run (or resume, or skip) the build of one index version.

    ``executor`` runs the per-class statistics (default: in this process); the inputs
    carry their own encoder, made by the same executor.
    """
    _check_calibration_fraction(options.calibration_fraction, inputs.class_sizes())
    fingerprint = options.fingerprint(inputs.fingerprint())
    existing = store.find_version_by_fingerprint(options.name, fingerprint)
    if existing is not None and existing.state is not VersionState.BUILDING:
        logger.info(
            "%s already holds these inputs (%s): nothing to build",
            existing.label,
            existing.state.value,
        )
        if activate and existing.state is not VersionState.ACTIVE:
            existing = store.activate(existing.id)
            logger.info("activated %s", existing.label)
        return BuildOutcome(existing, built=False, stage_seconds={})

    workspace = BuildWorkspace.for_build(data_dir, options.name, fingerprint)
    build = _Build(store, data_dir, inputs, options, workspace, executor or LocalExecutor())
    version = existing or build.create_version(fingerprint)
    if existing is not None:
        logger.info("resuming the build of %s from %s", version.label, workspace.root)
    version = build.run(version)
    if activate:
        version = store.activate(version.id)
        logger.info("activated %s", version.label)
    if not keep_workspace:
        workspace.remove()
    return BuildOutcome(version, built=True, stage_seconds=build.stage_seconds)


class _Build:
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

    def create_version(self, fingerprint: str) -> VersionRecord:
        options = self.options
        with self._stage("dictionary entries"):
            size = self.inputs.dictionary_size(self.workspace)
        if options.default_k > size:
            raise InvalidInputError(
                f"--default-k {options.default_k} is larger than the dictionary ({size} "
                "entries): every request at the default K would fail; lower --default-k"
            )
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
        )
        logger.info(
            "building %s (%d dictionary entries) in %s", version.label, size, self.workspace.root
        )
        return version

    def run(self, version: VersionRecord) -> VersionRecord:
        with self._stage("dictionary embeddings"):
            dictionary_file = self.inputs.dictionary_file(self.workspace)
        dictionary = np.load(dictionary_file, mmap_mode="r")
        if dictionary.shape[0] != version.dictionary_size:
            raise InvalidInputError(
                f"the dictionary has {dictionary.shape[0]} embeddings "
                f"for {version.dictionary_size} entries"
            )
        with self._stage("faiss index"):
            self._write_faiss(version, dictionary)
        with self._stage("normal embeddings"):
            normal_files = [
                self.inputs.class_embeddings_file(self.workspace, position)
                for position in range(len(self.inputs.class_names))
            ]
            labels = self.inputs.label_embeddings(self.workspace)
        self.inputs.release_encoder()
        with self._stage("class statistics"):
            records = self._class_statistics(dictionary_file, normal_files, labels)
        with self._stage("store rows"):
            self._write_store(version, self.inputs.dictionary_texts(self.workspace), records)
        if self.options.calibration_fraction > 0:
            with self._stage("calibration"):
                self._calibrate(version)
        version = self.store.mark_ready(version.id)
        logger.info("%s is ready", version.label)
        return version

    def _write_faiss(self, version: VersionRecord, dictionary: np.ndarray) -> None:
        relative = Path("indexes") / self.options.name / f"v{version.version}.faiss"
        target = self.data_dir / relative
        if self.workspace.has("faiss.sha256") and target.is_file():
            logger.info("FAISS index %s already written", target)
            return
        with tqdm(total=dictionary.shape[0], desc="index dictionary", unit="entry") as progress:
            index = build_index(dictionary, self.options.index, on_progress=progress.update)
        checksum = index.save(target)
        self.store.set_faiss_file(
            version.id, path=str(relative), kind=self.options.index.kind.value, checksum=checksum
        )
        self.workspace.save_lines(iter([checksum]), "faiss.sha256")

    def _class_statistics(
        self, dictionary_file: Path, normal_files: list[Path], labels: np.ndarray
    ) -> list[ClassRecord]:
        names = self.inputs.class_names
        dim = int(np.load(dictionary_file, mmap_mode="r").shape[1])
        _check_dimension("class prompt embeddings", labels, dim)
        tasks = []
        for position, normal_file in enumerate(normal_files):
            normal = np.load(normal_file, mmap_mode="r")
            _check_dimension(f"normal embeddings of {names[position]!r}", normal, dim)
            if not self.workspace.has("statistics", _statistics_file(position)):
                tasks.append(
                    ClassStatisticsTask(
                        position=position,
                        label_embedding=np.asarray(labels[position], dtype=np.float32),
                        dictionary_file=dictionary_file,
                        normal_file=normal_file,
                        calibration_fraction=self.options.calibration_fraction,
                        path=self.options.statistics_path,
                    )
                )
        done = len(names) - len(tasks)
        results = self.executor.map(run_class_statistics, tasks)
        with tqdm(total=len(names), initial=done, desc="class statistics", unit="class") as bar:
            for task, arrays in zip(tasks, results, strict=True):
                # The per-entry arrays are memory-mapped later, block by block.
                for kind in ("mean", "std"):
                    entry_values = arrays.pop(f"entry_{kind}")
                    self.workspace.save_array(
                        entry_values, "statistics", _entry_file(task.position, kind)
                    )
                self.workspace.save_arrays(arrays, "statistics", _statistics_file(task.position))
                logger.debug("class %d: %s path", task.position, arrays["path"])
                bar.update()
        return [
            self._class_record(position, name, labels[position], _statistics_file(position))
            for position, name in enumerate(names)
        ]

    def _class_record(self, position: int, name: str, label: np.ndarray, file: str) -> ClassRecord:
        arrays = self.workspace.load_arrays("statistics", file)
        return ClassRecord(
            position=position,
            name=name,
            prompt=format_prompt(self.options.prompt_template, name),
            label_embedding=np.asarray(label, dtype=np.float32),
            label_mean=float(arrays["label_mean"]),
            label_std=float(arrays["label_std"]),
            sample_count=int(arrays["count"]),
            moment_sum=arrays["moment_sum"],
            moment_outer=arrays["moment_outer"],
        )

    def _write_store(
        self, version: VersionRecord, texts: Iterator[str], records: list[ClassRecord]
    ) -> None:
        store = self.store
        if store.count_entries(version.id) != version.dictionary_size:
            store.write_entries(version.id, texts)
        store.write_classes(version.id, records)
        entries = version.dictionary_size
        block = max(1, STATISTICS_BLOCK_ROWS // len(records))
        # Blocks are written in order, one transaction each: the rows present say where
        # a killed build stopped.
        done = store.count_entry_statistics(version.id) // len(records)
        means = [
            self.workspace.load_array("statistics", _entry_file(r.position, "mean"), mmap=True)
            for r in records
        ]
        stds = [
            self.workspace.load_array("statistics", _entry_file(r.position, "std"), mmap=True)
            for r in records
        ]
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

    def _calibrate(self, version: VersionRecord) -> None:
        """Score the held-out normal images in every mode; store their sorted scores."""
        if self.store.load_calibration(version.id) is not None:
            return
        held_out = np.concatenate(
            [
                self.workspace.load_arrays("statistics", _statistics_file(position))["held_out"]
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
        logger.info("calibrated on %d held-out normal images", len(held_out))

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - started


def _check_calibration_fraction(fraction: float, class_sizes: list[int]) -> None:
    """Refuse, before anything is written, a fraction that would hold out no image."""
    if fraction == 0:
        return
    held_out = sum(len(holdout_split(size, fraction, 0)[1]) for size in class_sizes)
    if held_out == 0:
        raise InvalidInputError(
            f"--calibration-fraction {fraction} holds out no image (classes of "
            f"{max(class_sizes)} images at most): use a larger fraction or more normal images"
        )


def _statistics_file(position: int) -> str:
    """Written last for a class: its presence means the class's statistics are done."""
    return f"class_{position:05d}.npz"


def _entry_file(position: int, kind: str) -> str:
    return f"class_{position:05d}.entry_{kind}.npy"


def _check_dimension(what: str, embeddings: np.ndarray, dim: int) -> None:
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise InvalidInputError(
            f"{what} have shape {embeddings.shape}, the dictionary dimension is {dim}"
        )
