"""Where the indexer's heavy work runs: in this process, or on a Ray cluster.

Two kinds of work are distributed: encoding chunks of texts and images (GPU-bound; Ray
runs them on a pool of encoder actors, each loading the model once) and computing each
class's statistics (CPU-bound; one Ray task per class). Everything else - the FAISS
build, store writes, resumption - stays in the driver, so the two backends produce the
same files and rows. Ray workers read inputs and write nothing: the data directory and
the inputs must be on storage every node mounts, and every node needs bliss installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from bliss.errors import InvalidInputError

if TYPE_CHECKING:
    from bliss.encoders import ClipEncoder, ModelSpec

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class EncoderSettings:
    spec: ModelSpec
    device: str | None = None
    batch_size: int = 256
    precision: str = "fp32"  # fp16/bf16 on CUDA


class ChunkEncoder(Protocol):
    """Encodes chunks of prompts or images, yielding one array per chunk, in order."""

    @property
    def embedding_dim(self) -> int: ...

    def encode_prompts(
        self, chunks: Sequence[Sequence[str]], template: str
    ) -> Iterator[np.ndarray]: ...

    def encode_images(self, chunks: Sequence[Sequence[Path]]) -> Iterator[np.ndarray]: ...

    def close(self) -> None:
        """Release the model (GPU memory, Ray actors and the CPUs they reserve)."""
        ...


class Executor(Protocol):
    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
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
        self, chunks: Sequence[Sequence[str]], template: str
    ) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield self.encoder.encode_prompts(chunk, template)

    def encode_images(self, chunks: Sequence[Sequence[Path]]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield self.encoder.encode_images(list(chunk))

    def close(self) -> None:
        del self.encoder


class LocalExecutor:
    """Runs everything in this process (the default backend)."""

    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
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
    """Runs encoding on a pool of Ray actors and statistics as Ray tasks."""

    def __init__(
        self,
        address: str | None = None,
        *,
        gpus_per_encoder: float = 0.0,
        encoders: int | None = None,
    ) -> None:
        self.ray = _import_ray()
        if not self.ray.is_initialized():
            self.ray.init(
                address=address or os.environ.get("RAY_ADDRESS"),
                include_dashboard=False,
                log_to_driver=False,
            )
        self.gpus_per_encoder = gpus_per_encoder
        self.encoders = encoders or self._default_encoder_count()
        logger.info(
            "ray backend: %s, %d encoder actor(s) with %s GPU each",
            self.ray.cluster_resources(), self.encoders, gpus_per_encoder,
        )  # fmt: skip

    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
        remote = self.ray.remote(num_cpus=1)(task)
        references = [remote.remote(item) for item in items]
        for reference in references:
            yield self.ray.get(reference)

    def encoder(self, settings: EncoderSettings) -> ChunkEncoder:
        return RayChunkEncoder(self.ray, settings, self.encoders, self.gpus_per_encoder)

    def _default_encoder_count(self) -> int:
        """One actor per GPU when encoders use GPUs, else one per node."""
        if self.gpus_per_encoder > 0:
            gpus = self.ray.cluster_resources().get("GPU", 0)
            return max(1, int(gpus / self.gpus_per_encoder))
        return max(1, sum(1 for node in self.ray.nodes() if node.get("Alive")))


class RayChunkEncoder:
    def __init__(self, ray: Any, settings: EncoderSettings, actors: int, gpus: float) -> None:
        from ray.util import ActorPool

        self.ray = ray
        # Each actor holds one CPU (and its GPUs) until close(): statistics tasks need
        # those CPUs afterwards, so the pipeline closes the encoder before them.
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(_EncoderActor)
        self.actors = [actor_class.remote(settings) for _ in range(actors)]
        self.pool = ActorPool(self.actors)
        self._embedding_dim = int(ray.get(self.actors[0].embedding_dim.remote()))

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    def encode_prompts(
        self, chunks: Sequence[Sequence[str]], template: str
    ) -> Iterator[np.ndarray]:
        return self.pool.map(
            lambda actor, chunk: actor.encode_prompts.remote(chunk, template), chunks
        )

    def encode_images(self, chunks: Sequence[Sequence[Path]]) -> Iterator[np.ndarray]:
        return self.pool.map(lambda actor, chunk: actor.encode_images.remote(chunk), chunks)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class _EncoderActor:
    """One model per Ray actor, loaded once, encoding chunk after chunk."""

    def __init__(self, settings: EncoderSettings) -> None:
        from bliss.encoders import ClipEncoder

        self.encoder = ClipEncoder.load(
            settings.spec,
            device=settings.device,
            batch_size=settings.batch_size,
            precision=settings.precision,
        )

    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def encode_prompts(self, texts: Sequence[str], template: str) -> np.ndarray:
        return self.encoder.encode_prompts(texts, template)

    def encode_images(self, paths: Sequence[Path]) -> np.ndarray:
        return self.encoder.encode_images(list(paths))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidInputError(
            "--backend ray needs Ray: pip install 'bliss-anomaly[distributed]'"
        ) from None
    return ray
