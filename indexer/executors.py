"""Where the indexer's heavy work runs: in this process, or on a Ray cluster.

Two kinds of work are distributed: encoding chunks of texts and images (GPU-bound; Ray
runs them on a pool of encoder actors, each loading the model once) and computing each
class's statistics (CPU-bound; one Ray task per class). Everything else - the FAISS
build, store writes, resumption - stays in the driver, so the two backends produce the
same files and rows. Ray workers read inputs and write nothing: the data directory and
the inputs must be on storage every node mounts, and every node needs bliss installed.

On Ray, work streams: the driver submits a chunk or a task only when fewer than a fixed
number are outstanding (two chunks per encoder, one task per CPU), so its memory does not
grow with the input. What workers log or warn comes back with each result and is logged
again in the driver; an exception raised in a worker is raised again as itself, and a
dead worker, actor or node becomes one RayWorkerError line. Without an address bliss
starts a private local cluster (``bliss.indexer.ray_cluster``) that ends with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from bliss.errors import BlissError, InvalidInputError

if TYPE_CHECKING:
    from bliss.encoders import ClipEncoder, ModelSpec
    from bliss.indexer.ray_cluster import EncoderPlacement

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

# Chunks each encoder actor holds at once: one being encoded and one queued, so that no
# actor waits for the driver, while the driver holds at most two chunks per actor.
CHUNKS_PER_ENCODER = 2


@dataclass(frozen=True)
class EncoderSettings:
    spec: ModelSpec
    device: str | None = None
    batch_size: int = 256
    precision: str = "fp32"  # fp16/bf16 on CUDA


class ChunkEncoder(Protocol):
    """Encodes chunks of prompts or images, yielding one array per chunk, in order.

    ``chunks`` may be a lazy iterator over a huge input: it is read as encoding proceeds,
    never all at once.
    """

    @property
    def embedding_dim(self) -> int: ...

    def encode_prompts(
        self, chunks: Iterable[Sequence[str]], template: str
    ) -> Iterator[np.ndarray]: ...

    def encode_images(self, chunks: Iterable[Sequence[Path]]) -> Iterator[np.ndarray]: ...

    def close(self) -> None:
        """Release the model (GPU memory, Ray actors and the CPUs they reserve)."""
        ...


class Executor(Protocol):
    def map(self, task: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        """``task`` applied to every item; results in the order of ``items``."""
        ...

    def encoder(self, settings: EncoderSettings) -> ChunkEncoder: ...


class LocalChunkEncoder:
    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder = encoder

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def encode_prompts(
        self, chunks: Iterable[Sequence[str]], template: str
    ) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield self.encoder.encode_prompts(chunk, template)

    def encode_images(self, chunks: Iterable[Sequence[Path]]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield self.encoder.encode_images(list(chunk))

    def close(self) -> None:
        del self.encoder


class LocalExecutor:
    """Runs everything in this process (the default backend)."""

    def map(self, task: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        return (task(item) for item in items)

    def encoder(self, settings: EncoderSettings) -> ChunkEncoder:
        from bliss.encoders import ClipEncoder

        return LocalChunkEncoder(
            ClipEncoder.load(
                settings.spec,
                device=settings.device,
                batch_size=settings.batch_size,
                precision=settings.precision,
            )
        )


class RayExecutor:
    """Runs encoding on a pool of Ray actors and statistics as Ray tasks.

    Connects to the cluster at ``address`` (``auto``, ``ray://host:10001``, or
    RAY_ADDRESS), or starts a private local one that ends with this process.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        gpus_per_encoder: float = 0.0,
        encoders: int | None = None,
        cpus_per_encoder: int | None = None,
    ) -> None:
        from bliss.indexer.ray_cluster import plan_encoders

        self.ray = _import_ray()
        _connect(self.ray, address or os.environ.get("RAY_ADDRESS"))
        self.placements, description = plan_encoders(
            self.ray.nodes(),
            gpus_per_encoder=gpus_per_encoder,
            encoders=encoders,
            cpus_per_encoder=cpus_per_encoder,
        )
        logger.info("ray backend: %s", description)
        # Statistics tasks are CPU-bound and each returns a class's per-entry table (two
        # floats per dictionary entry): more in flight than CPUs would only fill memory.
        self.tasks_in_flight = max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def map(self, task: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        remote = self.ray.remote(num_cpus=1)(_logged_call)
        driver = DriverContext.current()
        return _ordered_results(
            self.ray,
            (remote.remote(driver, task, item) for item in items),
            self.tasks_in_flight,
        )

    def encoder(self, settings: EncoderSettings) -> ChunkEncoder:
        return RayChunkEncoder(self.ray, settings, self.placements)


class RayChunkEncoder:
    def __init__(
        self, ray: Any, settings: EncoderSettings, placements: list[EncoderPlacement]
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray = ray
        driver = DriverContext.current()
        # Each actor holds its CPUs (and GPUs) until close(): statistics tasks need those
        # CPUs afterwards, so the pipeline closes the encoder before them.
        actor_class = ray.remote(_EncoderActor)
        self.actors = [
            actor_class.options(
                num_cpus=placement.cpus,
                num_gpus=placement.gpus,
                scheduling_strategy=(
                    NodeAffinitySchedulingStrategy(placement.node_id, soft=True)
                    if placement.node_id
                    else "DEFAULT"
                ),
            ).remote(settings, placement.cpus, driver)
            for placement in placements
        ]
        try:
            loaded = [actor.load.remote() for actor in self.actors]
            # Every actor logs the same lines while it loads the model: show them once.
            dims = list(_ordered_results(ray, iter(loaded), len(loaded), seen=set()))
        except BaseException:
            self.close()
            raise
        self._embedding_dim = int(dims[0])
        self.limit = CHUNKS_PER_ENCODER * len(self.actors)

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    def encode_prompts(
        self, chunks: Iterable[Sequence[str]], template: str
    ) -> Iterator[np.ndarray]:
        return self._stream(
            chunks, lambda actor, chunk: actor.encode_prompts.remote(chunk, template)
        )

    def encode_images(self, chunks: Iterable[Sequence[Path]]) -> Iterator[np.ndarray]:
        return self._stream(chunks, lambda actor, chunk: actor.encode_images.remote(chunk))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def _stream(
        self, chunks: Iterable[Sequence[Any]], call: Callable[[Any, Sequence[Any]], Any]
    ) -> Iterator[np.ndarray]:
        """Each chunk to the least busy actor, at most ``limit`` chunks not yet yielded."""
        running: list[list[Any]] = [[] for _ in self.actors]

        def submit(chunk: Sequence[Any]) -> Any:
            pending = [reference for references in running for reference in references]
            if pending:
                done, _ = self.ray.wait(
                    pending, num_returns=len(pending), timeout=0, fetch_local=False
                )
                finished = set(done)
                for references in running:
                    references[:] = [r for r in references if r not in finished]
            index = min(range(len(running)), key=lambda i: len(running[i]))
            reference = call(self.actors[index], chunk)
            running[index].append(reference)
            return reference

        return _ordered_results(self.ray, (submit(chunk) for chunk in chunks), self.limit)


class _EncoderActor:
    """One model per Ray actor, loaded once, encoding chunk after chunk.

    Every method returns its result with what it logged or warned (``_logged_call``).
    """

    def __init__(self, settings: EncoderSettings, threads: int, driver: DriverContext) -> None:
        self.settings = settings
        self.threads = threads
        self.driver = driver

    def load(self) -> tuple[int, WorkerLog]:
        # Not in __init__: an error there reaches the driver as a bare "actor died".
        return _logged_call(self.driver, self._load)

    def encode_prompts(self, texts: Sequence[str], template: str) -> tuple[np.ndarray, WorkerLog]:
        return _logged_call(self.driver, self.encoder.encode_prompts, texts, template)

    def encode_images(self, paths: Sequence[Path]) -> tuple[np.ndarray, WorkerLog]:
        return _logged_call(self.driver, self.encoder.encode_images, list(paths))

    def _load(self) -> int:
        import torch

        from bliss.encoders import ClipEncoder

        # Ray sets OMP_NUM_THREADS to the reserved CPUs, but torch may have started first.
        torch.set_num_threads(self.threads)
        self.encoder = ClipEncoder.load(
            self.settings.spec,
            device=self.settings.device,
            batch_size=self.settings.batch_size,
            precision=self.settings.precision,
        )
        return self.encoder.embedding_dim


class RayWorkerError(BlissError):
    """A Ray worker, actor or node died, or Ray itself failed."""


@dataclass
class WorkerLog:
    """What a Ray task logged and warned (Ray drops both), replayed in the driver."""

    records: list[tuple[str, int, str]] = field(default_factory=list)
    warned: list[tuple[type[Warning], str, str, int]] = field(default_factory=list)

    def replay(self, seen: set[tuple[str, int, str]] | None = None) -> None:
        """Log and warn again here; records already in ``seen`` (which grows) are skipped."""
        for record in self.records:
            if seen is None or record not in seen:
                name, level, message = record
                logging.getLogger(name).log(level, "%s", message)
                if seen is not None:
                    seen.add(record)
        for category, message, filename, lineno in self.warned:
            warnings.warn_explicit(message, category, filename, lineno, registry=_WARNED)


# Which worker warnings the driver has shown: like a module's own registry, each shows
# once however many chunks and workers raise it (unless the warning filters say otherwise).
_WARNED: dict[Any, Any] = {}


class _Collect(logging.Handler):
    def __init__(self, level: int, log: WorkerLog) -> None:
        super().__init__(level)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.records.append((record.name, record.levelno, record.getMessage()))


@dataclass(frozen=True)
class DriverContext:
    """What a Ray task takes over from the driver."""

    log_level: int
    directory: str  # the working directory

    @classmethod
    def current(cls) -> DriverContext:
        return cls(logging.getLogger().getEffectiveLevel(), os.getcwd())


def _logged_call(
    driver: DriverContext, function: Callable[..., Result], *args: Any
) -> tuple[Result, WorkerLog]:
    """``function(*args)`` in a Ray worker, run in the driver's working directory, with
    the records at the driver's log level or above and the warnings it emitted; an
    exception carries them as ``worker_log``."""
    # Relative input paths then mean what they mean to the driver, wherever its directory
    # exists (on a worker node: shared storage mounted at the same path).
    if os.path.isdir(driver.directory):
        os.chdir(driver.directory)
    log = WorkerLog()
    handler = _Collect(driver.log_level, log)
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(driver.log_level)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the driver's filters decide what is shown
            try:
                return function(*args), log
            finally:
                log.warned += [(w.category, str(w.message), w.filename, w.lineno) for w in caught]
    except Exception as error:
        error.worker_log = log  # type: ignore[attr-defined]
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)


def _ordered_results(
    ray: Any,
    references: Iterator[Any],
    limit: int,
    seen: set[tuple[str, int, str]] | None = None,
) -> Iterator[Any]:
    """The results of ``references`` (tasks submitted as the iterator is advanced), in
    order, with at most ``limit`` submitted and not yet yielded: backpressure. ``seen``:
    see ``WorkerLog.replay``."""
    outstanding: deque[Any] = deque()
    try:
        for reference in references:
            outstanding.append(reference)
            if len(outstanding) >= limit:
                yield _result(ray, outstanding.popleft(), seen)
        while outstanding:
            yield _result(ray, outstanding.popleft(), seen)
    finally:
        for reference in outstanding:  # after an error: nobody waits for these
            with contextlib.suppress(Exception):
                ray.cancel(reference)


def _result(ray: Any, reference: Any, seen: set[tuple[str, int, str]] | None) -> Any:
    """One task's value, its log replayed; its exception as the one raised in the worker."""
    try:
        value, log = ray.get(reference)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        getattr(cause, "worker_log", WorkerLog()).replay(seen)
        if isinstance(cause, BlissError):
            raise cause from None
        raise cause from error  # a bug: keep the worker's traceback
    except ray.exceptions.RayError as error:
        raise _failure(ray, error) from error
    log.replay(seen)
    return value


def _failure(ray: Any, error: Exception) -> RayWorkerError:
    exceptions = ray.exceptions
    resume = "run the same command again to resume where it stopped"
    if isinstance(error, exceptions.OutOfMemoryError):
        return RayWorkerError(
            "a Ray worker was killed for lack of memory: lower --batch-size or "
            f"--ray-encoders, or give the nodes more memory, then {resume}"
        )
    # Ray's messages run to paragraphs of advice; the cause is in their first sentence
    # and, for a dead worker, in its exit detail.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else "no detail"
    first_sentence = re.split(r"(?<=\.)\s", last)[0]
    detail = f"{type(error).__name__}: {first_sentence}"
    exit_detail = re.search(r"Worker exit detail: (.+?\.)(\s|$)", last)
    if exit_detail:
        detail += f" {exit_detail.group(1)}"
    if isinstance(
        error,
        (
            exceptions.RayActorError,
            exceptions.WorkerCrashedError,
            exceptions.NodeDiedError,
            exceptions.LocalRayletDiedError,
            exceptions.ObjectLostError,
        ),
    ):
        return RayWorkerError(
            f"a Ray worker died ({detail}): when nothing killed it on purpose, the OOM killer "
            f"or a crash did (see dmesg and the Ray logs on its node); {resume}"
        )
    return RayWorkerError(f"Ray failed ({detail}): {resume}")


def _connect(ray: Any, address: str | None) -> None:
    """Join this process's Ray session, the cluster at ``address``, or a new local one."""
    if ray.is_initialized():
        return  # the application's own session, or the local cluster bliss started
    # Ray's log forwarding prints every worker line with prefixes and colour codes:
    # workers send what they log with their results instead (WorkerLog).
    options = {"log_to_driver": False, "logging_level": logging.WARNING}
    if not address:
        from bliss.indexer.ray_cluster import start_local_cluster

        start_local_cluster(ray, include_dashboard=False, **options)
        return
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RayWorkerError(
            f"cannot connect to the Ray cluster at {address} ({first_line}): check "
            "--ray-address (ray://HOST:10001 or auto) or RAY_ADDRESS, or leave both unset "
            "to start a local cluster"
        ) from error


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidInputError(
            "--backend ray needs Ray: pip install 'bliss-anomaly[distributed]'"
        ) from None
    return ray
