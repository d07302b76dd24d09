"""Assemble and run the gRPC server: services, TLS, token check, metrics, shutdown.

:class:`BlissServer` is the server on the caller's event loop (``bliss serve``);
:class:`BackgroundServer` runs one on a thread of its own, for tests, benchmarks and
notebooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from sqlalchemy.exc import SQLAlchemyError

from bliss.blas_kernels import describe_blas
from bliss.errors import InvalidInputError
from bliss.server.allocator_tuning import keep_freed_buffers
from bliss.server.auth import BearerTokenInterceptor
from bliss.server.health_monitor import HealthMonitor
from bliss.server.index_registry import IndexRegistry
from bliss.server.inference_protocol import INFERENCE_SERVICE, InferenceProtocolService
from bliss.server.metrics import MetricsEndpoint, ServerMetrics
from bliss.server.reflection import enable_reflection
from bliss.server.scoring_service import SCORER_SERVICE, AnomalyScorerService
from bliss.server.settings import ServerSettings
from bliss.server.status_codes import store_failure
from bliss.server.tracing import Tracing, start_tracing
from bliss.store import Store
from bliss.store.database import redact_url

logger = logging.getLogger(__name__)

# Clients may ping every 10 s while a long call runs (they default to 30 s); the gRPC
# default of 5 minutes would answer their keepalive pings with GOAWAY.
_MIN_CLIENT_PING_INTERVAL_MS = 10_000

_Result = TypeVar("_Result")


class BlissServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.port = 0
        self.metrics_port: int | None = None
        self._store: Store | None = None
        self._server: grpc.aio.Server | None = None
        self._service: AnomalyScorerService | None = None
        self._poller: asyncio.Task | None = None
        self._monitor: HealthMonitor | None = None
        self._health_checks: asyncio.Task | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.tracing: Tracing | None = None
        self._stopped: asyncio.Event | None = None
        self._serving = False  # the port is open: a start-up failure stops without a word
        self.health = health.aio.HealthServicer()
        self._registry: IndexRegistry | None = None

    @property
    def registry(self) -> IndexRegistry:
        if self._registry is None:
            raise RuntimeError("the server has not been started")
        return self._registry

    @property
    def security(self) -> str:
        if self.settings.tls_client_ca is not None:
            return "mTLS"
        return "TLS" if self.settings.tls_cert is not None else "plaintext"

    async def start(self) -> None:
        """Load the active versions, bind the port and start serving."""
        settings = self.settings
        self._stopped = asyncio.Event()
        token = settings.bearer_token()
        credentials = _server_credentials(settings)
        _configure_faiss_threads(settings.faiss_threads)
        logger.info("BLAS kernels: %s", describe_blas())
        if settings.malloc_tuning:
            keep_freed_buffers()
        # Before anything is served, and before the store opens: a missing extra is a
        # one-line configuration error, not a half-started server.
        self.tracing = start_tracing(settings)
        self._store = _open_store(settings.resolved_store_url)
        self._registry = IndexRegistry(self._store, settings, self.metrics, self.health)
        await self._registry.refresh()
        interceptors = [BearerTokenInterceptor(token, self.metrics)] if token else []
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Without this, a second server on the same port would bind too and silently
                # take half the connections.
                ("grpc.so_reuseport", 0),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", _MIN_CLIENT_PING_INTERVAL_MS),
                ("grpc.http2.min_ping_interval_without_data_ms", _MIN_CLIENT_PING_INTERVAL_MS),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._service = AnomalyScorerService(self.registry, settings, self.metrics)
        # The Open Inference Protocol (KServe v2) on the same port, scoring through the
        # native service so both share validation, scheduling, limits and metrics.
        inference = InferenceProtocolService(self._service, self.registry)
        self._server.add_generic_rpc_handlers(
            (self._service.method_handlers(), inference.method_handlers())
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            enable_reflection(
                self._server, (SCORER_SERVICE, INFERENCE_SERVICE, health.SERVICE_NAME)
            )
        self.port = self._bind(credentials)
        await self._server.start()
        self._serving = True
        loop = asyncio.get_running_loop()
        self._poller = loop.create_task(self.registry.poll_forever())
        self._monitor = HealthMonitor(self.registry, self._store, settings)
        self._health_checks = loop.create_task(self._monitor.run_forever())
        if settings.metrics:
            self._metrics_endpoint = MetricsEndpoint(
                self.metrics, settings.metrics_host, settings.metrics_port
            )
            self.metrics_port = self._metrics_endpoint.port
        served = ", ".join(s.label for s in self.registry.served_indexes()) or "nothing yet"
        logger.info(
            "listening on %s:%d (%s, bearer token %s, reflection %s); serving %s",
            settings.host,
            self.port,
            self.security,
            "required" if token else "off",
            "on" if settings.reflection else "off",
            served,
        )
        exposure = settings.exposure_warning()
        if exposure is not None:
            logger.warning(exposure)

    def _bind(self, credentials: grpc.ServerCredentials | None) -> int:
        assert self._server is not None
        host = self.settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        address = f"{host}:{self.settings.port}"
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise InvalidInputError(
                f"cannot listen on {address}: {error} (is another server using the port? "
                "pick another with --port / BLISS_PORT)"
            ) from error
        if port == 0:
            raise InvalidInputError(
                f"cannot listen on {address} (is another server using the port? pick another "
                "with --port / BLISS_PORT)"
            )
        return port

    async def stop(self, grace_s: float | None = None, *, delay_s: float | None = None) -> None:
        """Health to NOT_SERVING, refuse new calls, let in-flight ones finish, release all.

        ``delay_s`` (default: the shutdown delay setting) keeps serving while health says
        NOT_SERVING; ``grace_s`` (default: the grace period setting) bounds the drain.
        """
        if self._stopped is None or self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        delay = self.settings.shutdown_delay_s if delay_s is None else delay_s
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            logger.info("shutting down: NOT_SERVING for %.1f s before closing the port", delay)
            await asyncio.sleep(delay)
        if self._serving:
            logger.info("shutting down: draining in-flight calls for up to %.0f s", grace)
        for task in (self._poller, self._health_checks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._monitor is not None:
            await self._monitor.close()
        if self._server is not None:
            await self._server.stop(grace)
        if self._registry is not None:
            await self._registry.close()
        if self._service is not None:
            await asyncio.to_thread(self._service.close)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        if self._store is not None:
            self._store.close()
        if self.tracing is not None:
            self.tracing.close()  # exports the spans still batched
        self._stopped.set()
        if self._serving:
            logger.info("stopped")

    async def check_health(self) -> None:
        """One health check now: the store, the served files, the published statuses."""
        assert self._monitor is not None, "start() the server first"
        await self._monitor.check()

    async def stop_now(self) -> None:
        """Cancel in-flight calls (after a second signal); stop() still finishes the rest."""
        if self._server is not None:
            await self._server.stop(0)

    async def wait_stopped(self) -> None:
        assert self._stopped is not None, "start() the server first"
        await self._stopped.wait()


async def serve(
    settings: ServerSettings, on_started: Callable[[BlissServer], None] = lambda server: None
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (a second signal: at once)."""
    server = BlissServer(settings)
    loop = asyncio.get_running_loop()
    signals = 0
    stopping: list[asyncio.Task] = []

    def on_signal(number: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("received %s", signal.Signals(number).name)
            stopping.append(loop.create_task(server.stop()))
        else:
            logger.warning("second signal: stopping without waiting for in-flight calls")
            stopping.append(loop.create_task(server.stop_now()))

    try:
        await server.start()
    except BaseException:
        await server.stop(0, delay_s=0)
        raise
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    on_started(server)
    await server.wait_stopped()
    for task in stopping:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class BackgroundServer:
    """A BlissServer on its own event loop thread; use as a context manager."""

    def __init__(self, settings: ServerSettings, *, start_timeout_s: float = 120) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bliss-background-server", daemon=True
        )
        self._thread.start()
        self.server = BlissServer(settings)
        try:
            self.call(self.server.start(), timeout_s=start_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        """host:port to connect to (loopback when the server listens on every address)."""
        host = self.server.settings.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.server.port}"

    def call(self, coroutine: Coroutine[Any, Any, _Result], *, timeout_s: float = 60) -> _Result:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def refresh(self) -> None:
        """Poll the store now (instead of waiting for the poll interval)."""
        self.call(self.server.registry.refresh())

    def check_health(self) -> None:
        """Run the health check now (instead of waiting for its interval)."""
        self.call(self.server.check_health())

    def close(self, grace_s: float = 0, *, delay_s: float = 0) -> None:
        """Stop the server (see BlissServer.stop) and its loop thread."""
        if self._loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace_s, delay_s=delay_s), timeout_s=grace_s + delay_s + 60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_store(url: str) -> Store:
    """The store; a database error the store does not translate (a SQLite file that is
    no database) becomes one line instead of a traceback."""
    try:
        return Store.open(url)
    except SQLAlchemyError as error:
        raise store_failure(error, redact_url(url)) from None


def _server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    key = _read_pem(settings.tls_key, "tls_key")
    cert = _read_pem(settings.tls_cert, "tls_cert")
    client_ca = (
        _read_pem(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    )
    _check_tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the files with OpenSSL first: gRPC only reports a failed bind, which reads
    like a port in use."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificates: tuple[tuple[Path, str, str], ...] = (
        (cert, "TLS certificate", "--tls-cert / BLISS_TLS_CERT"),
    )
    if client_ca is not None:
        certificates += ((client_ca, "client CA bundle", "--tls-client-ca / BLISS_TLS_CLIENT_CA"),)
    for path, what, flag in certificates:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        except ssl.SSLError as error:
            raise InvalidInputError(
                f"the {what} {path} holds no certificate OpenSSL can read ({error.args[-1]}): "
                f"give PEM certificates ({flag})"
            ) from None
    try:
        # A password callback that gives none: an encrypted key fails instead of prompting.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise InvalidInputError(
                f"the TLS key {key} does not belong to the certificate {cert}: give that "
                "certificate's key (--tls-key / BLISS_TLS_KEY)"
            ) from None
        raise InvalidInputError(
            f"the TLS key {key} is not a private key OpenSSL can read, or it is encrypted: "
            "give the certificate's key as unencrypted PEM (--tls-key / BLISS_TLS_KEY)"
        ) from None


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read {setting} file {path}: {error}") from error
    if b"-----BEGIN" not in data:
        raise InvalidInputError(f"{setting} file {path} is not PEM (no '-----BEGIN' line)")
    return data


def _configure_faiss_threads(threads: int) -> None:
    """Threads of one search: FAISS's OpenMP pool and the BLAS pool flat search runs on."""
    if threads > 0:
        import faiss
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(threads)
        threadpool_limits(limits=threads, user_api="blas")
