"""`--backend ray` builds what the local backend builds, fails and warns as it does, and
leaves no process behind (on the private local Ray cluster that bliss starts)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bliss.encoders import TINY_TEST_MODEL, ModelSpec
from bliss.indexer.executors import EncoderSettings, RayExecutor, RayWorkerError
from bliss.indexer.ray_cluster import MAX_CPU_ENCODERS_PER_NODE, plan_encoders, stop_local_cluster
from bliss.store import Store
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli
from tests.synthetic_embeddings import synthetic_world
from tests.test_indexer_embeddings import bundle_from

ray = pytest.importorskip(
    "ray", reason="Ray is the `distributed` extra: pip install -e '.[distributed]'"
)

pytestmark = pytest.mark.slow

BLISS = Path(sys.executable).with_name("bliss")
GiB = 1024**3


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    """The in-process tests share the cluster the first of them starts."""
    yield
    stop_local_cluster()


def stored_version(data):
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        version = store.get_version("r", 1)
        classes = store.load_classes(version.id)
        mean, std = store.all_entry_statistics(version.id, len(classes), version.dictionary_size)
        return classes, mean, std, list(store.iter_entry_texts(version.id))


def assert_same_builds(*builds):
    """Equal up to float32 rounding: Ray workers run torch with another thread count."""
    (classes_a, mean_a, std_a, texts_a), (classes_b, mean_b, std_b, texts_b) = builds
    assert texts_a == texts_b
    assert [(c.name, c.sample_count) for c in classes_a] == [
        (c.name, c.sample_count) for c in classes_b
    ]
    for a, b in zip(classes_a, classes_b, strict=True):
        np.testing.assert_allclose(a.label_embedding, b.label_embedding, atol=1e-6)
        np.testing.assert_allclose(
            [a.label_mean, a.label_std], [b.label_mean, b.label_std], atol=1e-6
        )
    np.testing.assert_allclose(mean_a, mean_b, atol=1e-6)
    np.testing.assert_allclose(std_a, std_b, atol=1e-6)
    assert not np.allclose(mean_a, 0)


def test_ray_backend_builds_the_same_version_from_embeddings(tmp_path):
    folder = bundle_from(
        synthetic_world(classes=3, entries=200, per_class=20, tests=1), tmp_path / "b"
    )
    builds = []
    for backend in ("local", "ray"):
        data = tmp_path / backend
        result = run_cli(
            "index", "build", "--name", "r", "--from-embeddings", folder,
            "--calibration-fraction", "0.2", "--backend", backend, data_dir=data,
        )  # fmt: skip
        assert result.code == 0, result.stderr
        builds.append(stored_version(data))
    assert_same_builds(*builds)


def test_ray_backend_encodes_images_on_actors(tmp_path):
    write_shape_folders(tmp_path / "images", ["circle", "square"], 5, seed=4)
    words = tmp_path / "words.txt"
    words.write_text("".join(f"word {i}\n" for i in range(50)))
    builds = []
    for backend in ("local", "ray"):
        data = tmp_path / backend
        result = run_cli(
            "index", "build", "--name", "r", "--from-images", tmp_path / "images",
            "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--chunk-size", "16",
            "--backend", backend, "--ray-encoders", "2", data_dir=data,
        )  # fmt: skip
        assert result.code == 0, result.stderr
        builds.append(stored_version(data))
    assert_same_builds(*builds)


def image_build(images, words, backend, data):
    return run_cli(
        "index", "build", "--name", "r", "--from-images", images, "--model", TINY_TEST_MODEL,
        "--dictionary", f"file:{words}", "--chunk-size", "4", "--backend", backend,
        data_dir=data,
    )  # fmt: skip


def word_file(path, count):
    path.write_text("".join(f"word {i}\n" for i in range(count)))
    return path


def truncated_png(path):
    """A PNG whose chunks are intact (every CRC checks) but whose pixel data stops short:
    it passes the up-front image check and fails only when an encoder decodes it."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    data, chunks, position = buffer.getvalue(), [buffer.getvalue()[:8]], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IDAT":
            body = body[: len(body) // 2]
        crc = struct.pack(">I", zlib.crc32(kind + body))
        chunks.append(struct.pack(">I", len(body)) + kind + body + crc)
    path.write_bytes(b"".join(chunks))


def test_an_error_in_a_ray_actor_is_the_same_one_line_error_as_locally(tmp_path):
    write_shape_folders(tmp_path / "images", ["circle", "square"], 3, seed=4)
    truncated_png(tmp_path / "images" / "circle" / "zz_truncated.png")
    words = word_file(tmp_path / "words.txt", 10)
    stderr = {}
    for backend in ("local", "ray"):
        result = image_build(tmp_path / "images", words, backend, tmp_path / backend)
        assert result.code == 2, result.stderr
        stderr[backend] = result.stderr
    errors = {
        backend: [line for line in text.splitlines() if line.startswith("error:")]
        for backend, text in stderr.items()
    }
    assert errors["ray"] == errors["local"]
    assert len(errors["ray"]) == 1 and "cannot open image" in errors["ray"][0]
    assert "zz_truncated.png" in errors["ray"][0]
    assert "Traceback" not in stderr["ray"] and "\x1b[" not in stderr["ray"]


def test_warnings_and_log_records_of_ray_workers_reach_the_driver(tmp_path, caplog):
    write_shape_folders(tmp_path / "images", ["circle", "square"], 3, seed=4)
    # Converting a palette image with per-entry transparency to RGB makes PIL warn.
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "images" / "circle" / "zz_palette.png", transparency=bytes(256))
    caplog.set_level(logging.WARNING)
    with pytest.warns(UserWarning, match="Palette images with Transparency"):
        result = image_build(
            tmp_path / "images", word_file(tmp_path / "words.txt", 10), "ray", tmp_path / "d"
        )
    assert result.code == 0, result.stderr
    # open_clip logs this while a worker loads the model; once, however many encoders.
    loaded = [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    assert len(loaded) == 1 and loaded[0].levelno == logging.WARNING


def log_and_square(number):
    logging.getLogger("tests.ray_worker").warning("squaring %d", number)
    return number * number


def test_statistics_tasks_stream_results_and_their_log_records(caplog):
    caplog.set_level(logging.WARNING)
    squares = RayExecutor().map(log_and_square, range(7))
    assert list(squares) == [n * n for n in range(7)]
    logged = [r.getMessage() for r in caplog.records if r.name == "tests.ray_worker"]
    assert logged == [f"squaring {n}" for n in range(7)]


def test_the_default_encoder_count_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="bliss.indexer.executors")
    executor = RayExecutor()
    cpus = int(ray.cluster_resources()["CPU"])
    assert len(executor.placements) == min(cpus, MAX_CPU_ENCODERS_PER_NODE)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ray backend")]
    assert line.startswith(f"ray backend: {len(executor.placements)} encoder actor(s) on 1 node")


def test_encoders_are_planned_from_every_alive_node():
    nodes = [
        {"NodeID": "big", "Alive": True, "Resources": {"CPU": 64.0, "memory": 200 * GiB}},
        {"NodeID": "small", "Alive": True, "Resources": {"CPU": 4.0, "memory": 5 * GiB}},
        {"NodeID": "head", "Alive": True, "Resources": {"memory": 8 * GiB}},  # --num-cpus=0
        {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 32.0, "memory": 64 * GiB}},
    ]
    placements, line = plan_encoders(nodes)
    assert [(p.node_id, p.cpus) for p in placements] == [("big", 8)] * 8 + [("small", 2)] * 2
    assert line.startswith("10 encoder actor(s) on 2 node(s), 2-8 CPU(s)")
    placements, _ = plan_encoders(nodes, cpus_per_encoder=16)
    assert [(p.node_id, p.cpus) for p in placements] == [("big", 16)] * 4 + [("small", 4)]
    gpu_nodes = [{"NodeID": "g", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}}]
    placements, _ = plan_encoders(gpu_nodes, gpus_per_encoder=0.5)
    assert len(placements) == 8 and {(p.cpus, p.gpus, p.node_id) for p in placements} == {
        (1, 0.5, None)
    }
    with pytest.raises(Exception, match="no node with a CPU"):
        plan_encoders(nodes[2:])


def test_encoding_streams_a_lazy_input_with_bounded_chunks_in_flight():
    encoder = RayExecutor(encoders=2).encoder(
        EncoderSettings(ModelSpec(model_name=TINY_TEST_MODEL))
    )
    taken = []

    def chunks():
        for number in range(12):
            taken.append(number)
            yield [f"entry {number} {i}" for i in range(3)]

    try:
        results = encoder.encode_prompts(chunks(), "a photo of {label}")
        first = next(results)
        # Two chunks per actor were submitted before the first result was taken.
        assert len(taken) == 2 * 2
        rest = list(results)
    finally:
        encoder.close()
    assert first.shape == (3, encoder.embedding_dim) and len(rest) == 11


def test_a_dead_encoder_actor_is_one_clear_error():
    encoder = RayExecutor(encoders=1).encoder(
        EncoderSettings(ModelSpec(model_name=TINY_TEST_MODEL))
    )
    ray.kill(encoder.actors[0])
    try:
        with pytest.raises(RayWorkerError, match=r"^a Ray worker died \(.*run the same command"):
            list(encoder.encode_prompts([["a"], ["b"]], "{label}"))
    finally:
        encoder.close()


@pytest.mark.parametrize(
    "signal_number", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"]
)
def test_a_killed_driver_leaves_no_ray_process_and_no_files(tmp_path, signal_number):
    stop_local_cluster()  # only the cluster of the build below runs now
    write_shape_folders(tmp_path / "images", ["circle", "square"], 3, seed=4)
    words = word_file(tmp_path / "words.txt", 200_000)
    # Short: Ray's socket paths under it must stay within the 107 bytes Linux allows.
    scratch = Path(tempfile.mkdtemp(prefix="bt-"))
    environment = os.environ | {"HOME": str(tmp_path / "home"), "TMPDIR": str(scratch)}
    command = [
        BLISS, "index", "build", "--name", "r", "--from-images", tmp_path / "images",
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--chunk-size", "512",
        "--backend", "ray", "--data-dir", tmp_path / "data",
    ]  # fmt: skip
    driver = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        started = wait_for_encoders(driver)
        driver.send_signal(signal_number)
        code = driver.wait(timeout=30)
        left = wait_until_gone(started, seconds=10)
        files = list(scratch.iterdir())  # the cluster's private directory
    finally:
        driver.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    # SIGTERM unwinds the driver like Ctrl-C: "interrupted", code 130.
    assert code == (-signal.SIGKILL if signal_number == signal.SIGKILL else 130)
    assert not left, f"left running: {left}"
    assert files == []
    assert not (tmp_path / "home" / ".ray").exists()


def wait_for_encoders(driver, seconds=90):
    """The driver's descendants once its encoder actors run (Ray names their processes)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the build ended before its encoders started"
        processes = descendants(driver.pid)
        if any(command.startswith("ray::_EncoderActor") for command in processes.values()):
            return processes
        time.sleep(0.2)
    raise AssertionError("no encoder actor started in time")


def wait_until_gone(processes, seconds):
    deadline = time.monotonic() + seconds
    while True:
        alive = {pid: command for pid, command in processes.items() if running(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def descendants(pid):
    """{pid: command line} of every process below ``pid``."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append((int(entry.name), command))
    found, todo = {}, [pid]
    while todo:
        for child, command in children.get(todo.pop(), []):
            found[child] = command
            todo.append(child)
    return found


def running(pid):
    """Alive and not a zombie (a killed orphan may wait for a reaper in a container)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_local_build_killed_and_resumed_on_ray_equals_an_uninterrupted_ray_build(
    tmp_path, monkeypatch
):
    """Chunks encoded by another backend are encoded again: nothing of the two is mixed."""
    from tests.test_indexer_resume import Killed, KillSwitch, assert_identical, build, result_of

    write_shape_folders(tmp_path / "normal", ["circle", "square"], 6, seed=5)
    words = tmp_path / "words.txt"
    words.write_text("".join(f"word{i} thing\n" for i in range(120)))
    inputs = (tmp_path / "normal", words)
    KillSwitch(monkeypatch, at=6)  # texts, then 4 of the dictionary's 5 chunks
    with pytest.raises(Killed):
        build(inputs, tmp_path / "killed", chunk=25, batch=16)
    monkeypatch.undo()
    on_ray = ("--backend", "ray", "--ray-encoders", "1")
    resumed = build(inputs, tmp_path / "killed", chunk=25, batch=16, extra=on_ray)
    assert resumed.code == 0, resumed.stderr
    assert build(inputs, tmp_path / "clean", chunk=25, batch=16, extra=on_ray).code == 0
    assert_identical(result_of(tmp_path / "killed"), result_of(tmp_path / "clean"))
