"""The Ray cluster of a build: how many encoders it gets, and a private local cluster.

Encoders: see ``plan_encoders``. The rest of this module is the local cluster that
bliss starts when it is given no address, and the watchdog that ends it.

``ray.init()`` starts gcs_server, raylet, the dashboard head, the autoscaler monitor and
the log monitor as children that the kernel kills with the driver (PR_SET_PDEATHSIG). The
raylet's own children do not share that fate: when the driver is killed, the dashboard
and runtime-env agents keep running for a minute or more (each waits for the dead GCS
before exiting), and so can workers. So every process of a cluster bliss starts carries
a marker in its environment (children inherit it) or has its log files open in the
cluster's private directory, and a small watchdog, outside the driver's process group,
waits for the driver to close a pipe - or to die, which closes it too - and then kills
every such process and removes the directory. Clusters given by address are never touched.

Nothing of the cluster lands in the user's home or is readable by other users: Ray's
temp and session dirs live in a fresh 0700 directory (Ray makes its own temp dir
world-writable, so it sits one level down), and the token that authenticates clients to
this cluster is passed in the environment instead of Ray's default ~/.ray/auth_token.

This module imports only the standard library and bliss.errors at the top: it is also
the watchdog's program (``python -m bliss.indexer.ray_cluster``), which should start in
milliseconds.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bliss.errors import InvalidInputError
from bliss.logger_levels import logger_level

logger = logging.getLogger(__name__)

# CPU encoders per node at most, whatever its CPU count: each is a torch process holding
# its own model copy (about 0.8 GiB before the model's weights), and beyond a few
# actors per node more torch threads per actor serve as well (benchmarks/ray_scaling.py).
MAX_CPU_ENCODERS_PER_NODE = 8
# The memory assumed per CPU encoder when a node's Ray memory limits how many it gets.
ENCODER_MEMORY_BYTES = 2 * 1024**3

MARKER_VARIABLE = "BLISS_RAY_CLUSTER"
# One token for every cluster this process starts: Ray's driver caches the token it loaded
# first, so a second local cluster in the same process must use the same one.
_TOKEN = secrets.token_hex(32)
# Ray's notice that token authentication is on by default: bliss chose it deliberately.
_RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
_WATCHDOG_EXIT_SECONDS = 10.0
# Ray's socket paths add about 70 bytes to its temp dir, and Linux allows 107: under a
# longer TMPDIR (macOS-style /var/folders/...) the cluster's directory goes to /tmp.
_LONGEST_TEMP_ROOT = 30


@dataclass(frozen=True)
class EncoderPlacement:
    """What one encoder actor reserves; its torch threads equal its CPUs."""

    cpus: int
    gpus: float = 0.0
    node_id: str | None = None  # None: wherever Ray finds room


def plan_encoders(
    nodes: list[dict[str, Any]],
    *,
    gpus_per_encoder: float = 0.0,
    encoders: int | None = None,
    cpus_per_encoder: int | None = None,
) -> tuple[list[EncoderPlacement], str]:
    """The encoder actors for a cluster of ``nodes`` (``ray.nodes()``), and a line saying so.

    GPU encoders: one per ``gpus_per_encoder`` GPUs of the cluster, one CPU each. CPU
    encoders, pinned to their node: each alive node with a CPU gets one per CPU, at most
    MAX_CPU_ENCODERS_PER_NODE and one per ENCODER_MEMORY_BYTES of its Ray memory, and
    they share its CPUs; or one per ``cpus_per_encoder`` CPUs. ``encoders`` fixes the
    count instead (actors go wherever Ray finds room, ``cpus_per_encoder`` or 1 CPU each).
    """
    if encoders is not None and encoders < 1:
        raise InvalidInputError(f"--ray-encoders must be at least 1, got {encoders}")
    if cpus_per_encoder is not None and cpus_per_encoder < 1:
        raise InvalidInputError(
            f"--ray-cpus-per-encoder must be at least 1, got {cpus_per_encoder}"
        )
    alive = [node for node in nodes if node.get("Alive")]
    if gpus_per_encoder > 0:
        gpus = sum(node["Resources"].get("GPU", 0) for node in alive)
        count = encoders or max(1, int(gpus / gpus_per_encoder))
        cpus = cpus_per_encoder or 1
        if gpus < gpus_per_encoder * count:
            logger.warning(
                "the Ray cluster has %g GPU(s) for %d encoder(s) of %g GPU: they wait for "
                "nodes to join (or use --ray-gpus-per-encoder 0 for CPU encoders)",
                gpus, count, gpus_per_encoder,
            )  # fmt: skip
        origin = "as given" if encoders else f"one per {gpus_per_encoder:g} of {gpus:g} GPU(s)"
        return [EncoderPlacement(cpus, gpus_per_encoder)] * count, (
            f"{count} encoder actor(s) ({origin}), {gpus_per_encoder:g} GPU and {cpus} CPU each"
        )
    if encoders is not None:
        cpus = cpus_per_encoder or 1
        return [EncoderPlacement(cpus)] * encoders, (
            f"{encoders} encoder actor(s) (as given), {cpus} CPU(s) and torch thread(s) each"
        )
    placements = []
    for node in alive:
        node_cpus = int(node["Resources"].get("CPU", 0))
        if node_cpus < 1:
            continue  # e.g. a head node started with --num-cpus=0
        if cpus_per_encoder:
            count = max(1, node_cpus // cpus_per_encoder)
        else:
            by_memory = int(node["Resources"].get("memory", 0) // ENCODER_MEMORY_BYTES)
            count = max(1, min(node_cpus, MAX_CPU_ENCODERS_PER_NODE, by_memory))
        placements += [EncoderPlacement(node_cpus // count, 0.0, node["NodeID"])] * count
    if not placements:
        raise InvalidInputError(
            "the Ray cluster has no node with a CPU for encoders: add worker nodes, or use "
            "GPU encoders with --ray-gpus-per-encoder"
        )
    sizes = sorted({placement.cpus for placement in placements})
    cpus_each = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    rule = (
        f"one per {cpus_per_encoder} CPU(s) of each node"
        if cpus_per_encoder
        else f"one per CPU, at most {MAX_CPU_ENCODERS_PER_NODE} per node"
    )
    return placements, (
        f"{len(placements)} encoder actor(s) on {len({p.node_id for p in placements})} "
        f"node(s), {cpus_each} CPU(s) and torch thread(s) each ({rule}; --ray-encoders and "
        "--ray-cpus-per-encoder change this)"
    )


@dataclass
class LocalCluster:
    directory: Path
    marker: str
    watchdog: subprocess.Popen
    owns_sigterm: bool = False

    def stop(self, ray: Any) -> None:
        """Shut Ray down, then let the watchdog kill what is left and remove the files."""
        ray.shutdown()
        if self.watchdog.stdin is not None:
            self.watchdog.stdin.close()
        try:
            self.watchdog.wait(timeout=_WATCHDOG_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("the Ray watchdog (pid %d) did not finish", self.watchdog.pid)
        if self.owns_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


_cluster: LocalCluster | None = None


def start_local_cluster(ray: Any, **init_options: Any) -> LocalCluster:
    """``ray.init(**init_options)`` on a new local cluster that dies with this process."""
    global _cluster
    root = tempfile.gettempdir()
    if len(root) > _LONGEST_TEMP_ROOT and os.path.isdir("/tmp"):
        root = "/tmp"
    # 0700: the Ray temp dir inside it becomes world-writable, its sockets and logs do not.
    directory = Path(tempfile.mkdtemp(prefix="bliss-ray-", dir=root))
    marker = secrets.token_hex(8)
    watchdog = subprocess.Popen(
        [sys.executable, "-m", __name__, marker, str(directory), str(os.getpid())],
        stdin=subprocess.PIPE,
        # Not the driver's: a pipe reading them would wait for the watchdog too.
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: a Ctrl-C or a kill of the driver's process group spares it.
        start_new_session=True,
    )
    # Whether SIGTERM is ours to handle: ray.init() installs handlers of its own.
    owns_sigterm = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )
    cluster = LocalCluster(directory, marker, watchdog)
    try:
        with _cluster_environment(marker), logger_level(_RAY_TOKEN_NOTICE_LOGGER, logging.ERROR):
            ray.init(_temp_dir=str(directory / "ray"), **init_options)
    except BaseException:
        cluster.stop(ray)
        raise
    if owns_sigterm:
        # Ray's own handlers print a stack dump and exit without unwinding, skipping
        # atexit: unwinding like Ctrl-C does lets atexit stop the cluster cleanly.
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
        cluster.owns_sigterm = True
    _cluster = cluster
    atexit.unregister(stop_local_cluster)  # once, however many clusters this process starts
    atexit.register(stop_local_cluster)
    return cluster


def stop_local_cluster() -> None:
    """Stop the cluster this process started (a no-op when there is none)."""
    global _cluster
    if _cluster is not None:
        import ray

        cluster, _cluster = _cluster, None
        cluster.stop(ray)


@contextlib.contextmanager
def _cluster_environment(marker: str) -> Iterator[None]:
    """Variables the cluster's processes inherit while ray.init() starts them."""
    values = {MARKER_VARIABLE: marker}
    if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        values["RAY_AUTH_TOKEN"] = _TOKEN
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        # The token stays: the driver reads it again when it reconnects to its GCS.
        saved_marker = saved[MARKER_VARIABLE]
        if saved_marker is None:
            del os.environ[MARKER_VARIABLE]
        else:
            os.environ[MARKER_VARIABLE] = saved_marker


def _interrupt_on_sigterm(number: int, frame: Any) -> None:
    # Not SystemExit: inside ray.get() Ray turns that into an exit of the process, and
    # only KeyboardInterrupt into an exception that unwinds the driver.
    raise KeyboardInterrupt


def cluster_processes(marker: str, directory: Path) -> list[int]:
    """Processes of this user that belong to the cluster: their environment carries
    ``marker``, or they hold a file under ``directory`` open (Ray points every process's
    output at its log files there).

    Both, because Ray renames its agents and workers with setproctitle, which overwrites
    the memory /proc reads the environment from, and a process has no log file yet in
    the moment after it starts.
    """
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            marked = needle in (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marked or _holds_file_under(entry, f"{directory}/"):
            found.append(int(entry.name))
    return found


def _holds_file_under(process: Path, prefix: str) -> bool:
    try:
        descriptors = list((process / "fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor).startswith(prefix):  # deleted files keep their path
                return True
        except OSError:  # closed since the listing
            continue
    return False


def _watch(marker: str, directory: Path, driver: int) -> None:
    """Wait for the driver to close stdin (or die), then end the cluster it started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()
    spared = {driver, os.getpid()}
    # Ends quickly: nothing restarts a process once gcs_server and raylet are gone.
    for _ in range(50):
        victims = [pid for pid in cluster_processes(marker, directory) if pid not in spared]
        if not victims:
            break
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    _watch(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
