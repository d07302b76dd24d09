"""The index versions this server serves, and their hot swap.

At start every active version is loaded; then the store is polled and a newly activated
version is loaded *beside* the one being served, switched in with a single dict
assignment on the event loop (atomic for every request that starts after it), and the
old one is released once its in-flight requests have finished. A request leases the
version it resolved, so it finishes on that version whatever happens meanwhile.

A version that fails to load never takes the server down: the previous version (if any)
keeps serving, the failure is logged and counted, and the load is retried later.

The health check (:mod:`bliss.server.health_monitor`) marks the store, or a served
version whose files changed, unusable; :meth:`IndexRegistry.resolve` then answers
UNAVAILABLE for it and :meth:`IndexRegistry.publish_health` reports NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2
from sqlalchemy.exc import SQLAlchemyError

from bliss.errors import BlissError, InvalidInputError, NotFoundError
from bliss.gpu_index import GpuOptions
from bliss.scorer import Scorer
from bliss.server.encode_batcher import EncodeBatcher
from bliss.server.error_details import redact_locations, shorten
from bliss.server.health_monitor import FileState, served_file_states
from bliss.server.request_limits import check_version_defaults, entry_text_bound
from bliss.server.status_codes import IndexUnavailableError, store_failure
from bliss.server.version_leases import ServerLeases
from bliss.version_loader import load_scorer

if TYPE_CHECKING:
    from grpc_health.v1.health import aio as health_aio

    from bliss.encoders import ClipEncoder
    from bliss.server.metrics import ServerMetrics
    from bliss.server.settings import ServerSettings
    from bliss.store import Store, VersionRecord

logger = logging.getLogger(__name__)

OVERALL_HEALTH = ""
# A version whose load failed is tried again after this long (a poll may come sooner).
RETRY_FAILED_LOAD_S = 60.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

EncoderKey = tuple[str, str, "str | None"]


@dataclass(eq=False)
class ImageEncoding:
    """An image encoder and its micro-batcher, shared by the versions of one model."""

    key: EncoderKey
    encoder: ClipEncoder
    batcher: EncodeBatcher
    users: int = 0


@dataclass(eq=False)
class ServedIndex:
    """One loaded index version; ``in_flight`` counts the requests leasing it."""

    version: VersionRecord
    scorer: Scorer
    images: ImageEncoding | None
    images_unavailable_reason: str  # shown to clients: no paths or URLs
    loaded_at: datetime
    entry_text_bound: int  # longest top-entry text in a response, UTF-8 bytes
    files: tuple[FileState, ...]  # as they were when loaded: the health check compares
    problem: str | None = None  # why its files are unusable (log only), from the health check
    in_flight: int = 0
    retired: bool = False
    released: bool = False

    @property
    def label(self) -> str:
        return self.version.label

    @property
    def statistics_source(self) -> str:
        return self.scorer.statistics.source


@dataclass(frozen=True)
class _FailedLoad:
    version: VersionRecord
    at: float


class IndexRegistry:
    def __init__(
        self,
        store: Store,
        settings: ServerSettings,
        metrics: ServerMetrics,
        health: health_aio.HealthServicer,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._health = health
        self._served: dict[str, ServedIndex] = {}
        self._failed: dict[str, _FailedLoad] = {}
        self._encodings: dict[EncoderKey, ImageEncoding] = {}
        self._background: set[asyncio.Task] = set()
        # Why the store is unusable (log only), from the health check; None while it is fine.
        self.store_problem: str | None = None
        # What this server serves, recorded in the store so that it is not deleted.
        self._leases = ServerLeases(store, settings.poll_interval_s)

    # ------------------------------------------------------------------ requests

    def served_indexes(self) -> list[ServedIndex]:
        return [self._served[name] for name in sorted(self._served)]

    def resolve(self, name: str) -> ServedIndex:
        """The served version of index ``name`` ('' when exactly one index is active)."""
        known = sorted(set(self._served) | set(self._failed))
        if not name:
            if len(known) > 1:
                raise InvalidInputError(
                    f"this server serves {len(known)} indexes ({', '.join(known)}): set the "
                    "index name in the request options"
                )
            if not known:
                raise NotFoundError(
                    "no index is active in the store: build one and activate it "
                    "(bliss index activate NAME --version N); the server picks it up on its "
                    "next poll"
                )
            name = known[0]
        served = self._served.get(name)
        if served is not None:
            self._check_usable(served)
            return served
        failed = self._failed.get(name)
        if failed is not None:
            # The reason (file paths, store errors) stays in the server log.
            raise IndexUnavailableError(
                f"index {name!r} is active but its version {failed.version.label} failed to "
                f"load on this server (its log has the reason); the server retries every "
                f"{RETRY_FAILED_LOAD_S:.0f} s"
            )
        raise NotFoundError(
            f"no active index is named {shorten(name)!r}; served: {', '.join(known) or 'none'}"
        )

    @contextmanager
    def lease(self, name: str) -> Iterator[ServedIndex]:
        """Resolve ``name`` and keep that version alive until the block ends."""
        served = self.resolve(name)
        served.in_flight += 1
        try:
            yield served
        finally:
            served.in_flight -= 1
            if served.retired and served.in_flight == 0:
                self._release(served)

    def _check_usable(self, served: ServedIndex) -> None:
        """UNAVAILABLE while the health check finds the store or the version's files
        unusable; the reason, with paths and database errors, is in the server log."""
        if self.store_problem is not None:
            raise IndexUnavailableError(
                "the statistics store is unusable from this server (its log has the reason); "
                "retry later or on another server"
            )
        if served.problem is not None:
            what = (
                f"the Milvus collection of {served.label} cannot be searched"
                if served.version.dictionary_store == "milvus"
                else f"the files of {served.label} changed or went missing since it was loaded"
            )
            raise IndexUnavailableError(
                f"index {served.version.name!r} is not serving on this server: {what} (its log "
                "has the reason); retry on another server"
            )

    # ------------------------------------------------------------------ health

    async def publish_health(self) -> None:
        """Each index: SERVING while loaded with its files intact and the store usable.
        The server (''): SERVING while at least one index is."""
        serving = 0
        for name in sorted(set(self._served) | set(self._failed)):
            served = self._served.get(name)
            usable = served is not None and served.problem is None and not self.store_problem
            serving += usable
            await self._health.set(name, _SERVING if usable else _NOT_SERVING)
        await self._health.set(OVERALL_HEALTH, _SERVING if serving else _NOT_SERVING)

    async def reload(self, served: ServedIndex) -> bool:
        """Load ``served``'s version again, from files restored or rewritten since it was
        loaded (the health check verified them); True when the new copy serves."""
        name = served.version.name
        if self._served.get(name) is not served:
            return False  # another version took over meanwhile
        await self._load(served.version)
        return self._served.get(name) is not served

    # ------------------------------------------------------------------ loading

    async def refresh(self) -> None:
        """Load every active version not served yet; retire what is no longer active."""
        if self.store_problem is not None:
            # A new pooled connection to a deleted SQLite file would create an empty one;
            # the health check says when the store is back.
            return
        try:
            active = await asyncio.to_thread(self._store.active_versions)
        except Exception as error:
            # Until the health check finds the store unusable, the loaded versions serve.
            if isinstance(error, SQLAlchemyError):
                error = store_failure(error, self._store.url)
            logger.warning("cannot poll the store (%s); serving the loaded versions", error)
            return
        active_names = {version.name for version in active}
        for version in active:
            current = self._served.get(version.name)
            if current is not None and current.version.id == version.id:
                self._failed.pop(version.name, None)
                continue
            if self._should_wait_before_retrying(version):
                continue
            await self._load(version)
        for name in [n for n in self._served if n not in active_names]:
            logger.warning("index %s is no longer active in the store: stopped serving it", name)
            self._retire(self._served.pop(name))
            self._metrics.index_version.remove(name)
            await self._health.set(name, _NOT_SERVING)
        for name in [n for n in self._failed if n not in active_names]:
            del self._failed[name]
        await self.publish_health()

    async def poll_forever(self) -> None:
        renewing = asyncio.get_running_loop().create_task(self._leases.renew_forever())
        try:
            while True:
                await asyncio.sleep(self._settings.poll_interval_s)
                await self.refresh()
        finally:
            renewing.cancel()

    async def close(self) -> None:
        for served in self._served.values():
            self._retire(served)
        self._served.clear()
        for encoding in list(self._encodings.values()):
            await encoding.batcher.close()
        self._encodings.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._leases.release_all()

    def _should_wait_before_retrying(self, version: VersionRecord) -> bool:
        failed = self._failed.get(version.name)
        return (
            failed is not None
            and failed.version.id == version.id
            and time.monotonic() - failed.at < RETRY_FAILED_LOAD_S
        )

    async def _load(self, version: VersionRecord) -> None:
        started = time.monotonic()
        logger.info("loading %s", version.label)
        try:
            scorer, text_bound, files = await self._leases.load_leased(
                version, lambda: asyncio.to_thread(self._load_scorer, version)
            )
        except Exception as error:
            # Whatever broke (missing or changed FAISS file, incomplete rows, store outage),
            # the versions already served keep serving.
            if isinstance(error, BlissError):
                logger.warning("cannot load %s: %s", version.label, error)
            else:
                logger.exception("cannot load %s", version.label)
            self._failed[version.name] = _FailedLoad(version, time.monotonic())
            self._metrics.index_loads.labels(version.name, "failed").inc()
            if version.name not in self._served:
                await self._health.set(version.name, _NOT_SERVING)
            return
        images, reason = await self._image_encoding(version)
        served = ServedIndex(
            version=version,
            scorer=scorer,
            images=images,
            images_unavailable_reason=reason,
            loaded_at=datetime.now(timezone.utc),
            entry_text_bound=text_bound,
            files=files,
        )
        previous = self._served.get(version.name)
        self._served[version.name] = served  # the switch
        self._failed.pop(version.name, None)
        self._metrics.index_loads.labels(version.name, "loaded").inc()
        self._metrics.index_version.labels(version.name).set(version.version)
        await self._health.set(version.name, _SERVING)
        logger.info(
            "serving %s (statistics from %s%s) after %.1f s%s",
            version.label,
            served.statistics_source,
            "" if images else "; images refused: " + reason,
            time.monotonic() - started,
            f", replacing {previous.label}" if previous else "",
        )
        if previous is not None:
            self._retire(previous)

    def _load_scorer(self, version: VersionRecord) -> tuple[Scorer, int, tuple[FileState, ...]]:
        """The version's scorer, its entry-text bound and its files' states before loading
        (so a change during the load shows at the next health check); unusable defaults
        refuse it."""
        files = served_file_states(version, self._settings.data_dir)
        try:
            scorer = load_scorer(
                self._store,
                version,
                self._settings.data_dir,
                memory_budget_bytes=self._settings.memory_budget_bytes,
                use_gpu=self._settings.faiss_gpu,
                gpu_options=GpuOptions(float16=self._settings.faiss_gpu_float16),
            )
        except SQLAlchemyError as error:
            raise store_failure(error, self._store.url) from None
        check_version_defaults(scorer.defaults, version.label)
        return scorer, entry_text_bound(scorer), files

    async def _image_encoding(self, version: VersionRecord) -> tuple[ImageEncoding | None, str]:
        from bliss.version_loader import image_encoder_for

        key: EncoderKey = (version.model_name, version.model_weights, version.model_checksum)
        encoding = self._encodings.get(key)
        if encoding is None:
            try:
                encoder = await asyncio.to_thread(
                    image_encoder_for,
                    version,
                    self._settings.device,
                    self._settings.encode_batch_size,
                    self._settings.encode_precision,
                )
            except BlissError as error:
                logger.info("%s cannot encode images: %s", version.label, error)
                return None, redact_locations(str(error))
            except Exception:
                logger.exception("the image encoder of %s failed to load", version.label)
                return None, "its image encoder failed to load (the server log has the details)"
            batcher = EncodeBatcher(
                encoder.encode_image_batch,
                name=version.model_name,
                max_batch=self._settings.encode_batch_size,
                max_delay_s=self._settings.encode_max_delay_ms / 1000,
                on_batch=self._metrics.encode_batch_images.observe,
            )
            encoding = self._encodings[key] = ImageEncoding(key, encoder, batcher)
        encoding.users += 1
        return encoding, ""

    # ------------------------------------------------------------------ release

    def _retire(self, served: ServedIndex) -> None:
        served.retired = True
        if served.in_flight == 0:
            self._release(served)
        else:
            logger.info(
                "%s retired; releasing it when its %d in-flight requests finish",
                served.label,
                served.in_flight,
            )

    def _release(self, served: ServedIndex) -> None:
        if served.released:
            return
        served.released = True
        encoding = served.images
        if encoding is not None:
            encoding.users -= 1
            if encoding.users == 0 and self._encodings.get(encoding.key) is encoding:
                del self._encodings[encoding.key]
                task = asyncio.get_running_loop().create_task(encoding.batcher.close())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        self._leases.release(served.version.id)
        logger.info("released %s", served.label)
