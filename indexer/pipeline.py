"""The build pipeline: stages from inputs to a ready (and optionally active) index version.

A build is identified by a fingerprint of its inputs and options. Running it again finds
the version with that fingerprint: a finished one is left alone, an unfinished one
(state ``building``) resumes from the files its workspace already holds. Store writes
are one transaction per table (per class for the statistics), and the version only
becomes ``ready`` once every row is there, so the server never sees half a version.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bliss.calibration import holdout_split
from bliss.errors import InvalidInputError, NotFoundError
from bliss.indexer.build_inputs import BuildInputs
from bliss.indexer.build_options import BuildOptions, BuildOutcome
from bliss.indexer.build_run import BuildRun
from bliss.indexer.executors import Executor, LocalExecutor
from bliss.indexer.garbage import remove_workspace
from bliss.indexer.workspace import BuildWorkspace
from bliss.store import Store, VersionRecord, VersionState
from bliss.version_check import verify_version

logger = logging.getLogger(__name__)


def build_version(
    store: Store,
    data_dir: Path,
    inputs: BuildInputs,
    options: BuildOptions,
    *,
    activate: bool = False,
    keep_workspace: bool = False,
    executor: Executor | None = None,
    run_type: type[BuildRun] | None = None,
    parent: VersionRecord | None = None,
    wait: bool = False,
    rebuild: bool = False,
) -> BuildOutcome:
    """Run (or resume, or skip) the build of one index version.

    ``executor`` runs the per-class statistics (default: in this process); the inputs
    carry their own encoder, made by the same executor. ``run_type`` and ``parent`` are
    how ``bliss index extend`` builds a version from ``parent`` plus new inputs.
    The same build running elsewhere stops this one (BuildInProgressError), or with
    ``wait`` is waited for. ``rebuild`` builds a new version even when a finished one has
    these inputs (to replace one whose files are damaged).
    """
    run_type = run_type or BuildRun
    _check_calibration_fraction(options.calibration_fraction, inputs.class_sizes())
    fingerprint = options.fingerprint(inputs.fingerprint())
    # Held until the build is done: an identical build never does the same work beside it.
    with store.build_lock(options.name, fingerprint, wait=wait):
        return _build_locked(
            store, data_dir, inputs, options, fingerprint, run_type, parent,
            activate=activate, keep_workspace=keep_workspace, executor=executor,
            rebuild=rebuild,
        )  # fmt: skip


def _build_locked(
    store: Store,
    data_dir: Path,
    inputs: BuildInputs,
    options: BuildOptions,
    fingerprint: str,
    run_type: type[BuildRun],
    parent: VersionRecord | None,
    *,
    activate: bool,
    keep_workspace: bool,
    executor: Executor | None,
    rebuild: bool,
) -> BuildOutcome:
    existing = store.find_version_by_fingerprint(options.name, fingerprint)
    if existing is not None and existing.state is not VersionState.BUILDING:
        # Rerunning the build is what a damaged version's messages advise: it repairs.
        damage = "--rebuild" if rebuild else _damage(store, existing, data_dir)
        if damage is None:
            logger.info(
                "%s already holds these inputs (%s, files verified): nothing to build",
                existing.label,
                existing.state.value,
            )
            if activate and existing.state is not VersionState.ACTIVE:
                existing = store.activate(existing.id)
                logger.info("activated %s", existing.label)
            return BuildOutcome(existing, built=False, stage_seconds={})
        logger.warning("building a new version to replace %s (%s)", existing.label, damage)
        existing = None

    workspace = BuildWorkspace.for_build(data_dir, options.name, fingerprint).open(fingerprint)
    build = run_type(store, data_dir, inputs, options, workspace, executor or LocalExecutor())
    try:
        version = existing or build.create_version(fingerprint, parent)
    except InvalidInputError:
        remove_workspace(data_dir, workspace)  # refused before any version existed
        raise
    if existing is not None:
        logger.info("resuming the build of %s from %s", version.label, workspace.root)
    version = build.run(version)
    if activate:
        version = store.activate(version.id)
        logger.info("activated %s", version.label)
    if not keep_workspace:
        remove_workspace(data_dir, workspace)
    return BuildOutcome(version, built=True, stage_seconds=build.stage_seconds)


def _damage(store: Store, version: VersionRecord, data_dir: Path) -> str | None:
    """Why a finished version's files cannot be served as they are, or None."""
    try:
        verify_version(store, version, data_dir)
    except (InvalidInputError, NotFoundError, OSError) as error:
        return str(error)
    return None


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
