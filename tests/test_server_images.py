"""Images through the server (tiny model): parity with --local, micro-batching, bad images,
and a graceful shutdown that lets an in-flight call finish."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from bliss.client import BlissClient, ScoringServiceError
from bliss.encoders import TINY_TEST_MODEL, ClipEncoder, ModelSpec
from bliss.server.image_decoding import ImageLimits, decode_image
from bliss.server.runtime import BackgroundServer
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli
from tests.serving_fixtures import embedding_items_match, local_lines, server_settings

SHAPES = ["circle", "square", "triangle"]
WORDS = ["cat", "dog", "circle", "box", "star", "tree", "wheel", "sign", "roof", "kite", "moon"]
MAX_PIXELS = 200_000
MAX_REQUEST_PIXELS = 300_000
MAX_IMAGE_MIB = 0.1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """An active tiny-model index 'shapes' built from generated images, and test images."""
    root = tmp_path_factory.mktemp("shapes")
    write_shape_folders(root / "normal", SHAPES, 5, seed=1)
    tests = write_shape_folders(root / "test", ["circle", "cross", "ring"], 2, seed=2)
    words = root / "words.txt"
    words.write_text("".join(f"{w}\n" for w in WORDS))
    data = root / "data"
    built = run_cli(
        "index", "build", "--name", "shapes", "--from-images", root / "normal",
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--activate",
        data_dir=data,
    )  # fmt: skip
    assert built.code == 0, built.stderr
    return data, [path for paths in tests.values() for path in paths]


@pytest.fixture(scope="module")
def server(shapes):
    data, _ = shapes
    settings = server_settings(
        data,
        encode_batch_size=16,
        encode_max_delay_ms=150,
        max_image_pixels=MAX_PIXELS,
        max_request_pixels=MAX_REQUEST_PIXELS,
        max_image_mib=MAX_IMAGE_MIB,
    )
    with BackgroundServer(settings) as running:
        yield running


def png_bytes(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_images_scored_by_the_server_equal_local_scores(shapes, server):
    data, images = shapes
    common = ("--images", *images, "--k", "3", "--class-scores", "--batch-size", "4")
    local = local_lines(data, None, "--index", "shapes", *common)
    # One call at a time, so the server encodes the same batches of 4 and 2 as --local:
    # float32 encoder outputs depend on the batch composition by ~1e-7, which the small
    # sigmas of this random model magnify past 1e-6.
    remote = run_cli(
        "score", "--server", server.address, *common, "--concurrency", "1", data_dir=data
    )
    assert remote.code == 0, remote.stderr
    embedding_items_match([json.loads(line) for line in remote.stdout.splitlines()], local)

    # Images and embeddings in one request: each row scored as if sent alone.
    encoder = ClipEncoder.load(ModelSpec(TINY_TEST_MODEL))
    vectors = encoder.encode_images(images[:2])
    with BlissClient(server.address) as client:
        mixed = client.score(
            embeddings=vectors, images=[images[2].read_bytes()], ids=["v0", "v1", "raw"], k=3
        )
        alone = client.score(embeddings=vectors, k=3) + client.score(images=[images[2]], k=3)
    assert [item.id for item in mixed] == ["v0", "v1", "raw"]
    assert [item.score for item in mixed] == pytest.approx([a.score for a in alone], abs=1e-9)
    assert mixed[2].top_entries == alone[2].top_entries


def test_concurrent_image_requests_share_micro_batches(shapes, server):
    _, images = shapes
    metrics = server.server.metrics
    batches_before = metrics.registry.get_sample_value("bliss_encode_batch_images_count") or 0
    images_before = metrics.registry.get_sample_value("bliss_encode_batch_images_sum") or 0
    results: dict[int, float] = {}
    with BlissClient(server.address) as client:

        def score(position: int) -> None:
            results[position] = client.score(images=[images[position]])[0].score

        threads = [threading.Thread(target=score, args=(i,)) for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sequential = [client.score(images=[path])[0].score for path in images]
    # Batched with other calls: equal up to float32 batch-composition noise.
    assert [results[i] for i in range(len(images))] == pytest.approx(sequential, abs=1e-4)
    batches = metrics.registry.get_sample_value("bliss_encode_batch_images_count") - batches_before
    encoded = metrics.registry.get_sample_value("bliss_encode_batch_images_sum") - images_before
    assert encoded == 2 * len(images)
    # The concurrent calls shared micro-batches: fewer batches than single-image calls.
    assert batches < 2 * len(images)


def test_bad_images_get_invalid_argument_naming_the_item(shapes, server):
    _, images = shapes
    good = images[0].read_bytes()
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8))
    cases = {
        "not an image": (b"these are not image bytes", "not an image in a supported format"),
        "empty": (b"", "the image is empty"),
        "truncated": (good[: len(good) // 2], "cannot be decoded"),
        "too many bytes": (png_bytes(noisy), "over the server's limit"),
        "too many pixels": (png_bytes(Image.new("RGB", (600, 600))), "600x600 = 360,000 pixels"),
        "unsupported format": (png_bytes(Image.new("RGB", (8, 8)), "PPM"), "supported format"),
    }
    assert len(png_bytes(noisy)) > MAX_IMAGE_MIB * 2**20  # the case tests what it says
    with BlissClient(server.address) as client:
        for name, (data, message) in cases.items():
            with pytest.raises(ScoringServiceError) as caught:
                client.score(images=[good, data, good], ids=["ok-1", name, "ok-2"])
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert caught.value.details.startswith(f"item 1 (id {name!r}): "), name
            assert message in caught.value.details, (name, caught.value.details)
        # A GIF is fine, and the server still serves after all that.
        gif = png_bytes(Image.open(images[0]).convert("RGB"), "GIF")
        assert len(client.score(images=[gif, good])) == 2


def test_pixel_budgets_are_checked_from_headers_before_decoding(shapes, server):
    _, images = shapes
    good = images[0].read_bytes()
    with BlissClient(server.address, max_retries=0) as client:
        for width, height, declared in (
            (100_000, 100_000, "over 178,956,970"),  # past PIL's own hard limit
            (500, 500, "500x500 = 250,000"),
        ):
            started = time.monotonic()
            with pytest.raises(ScoringServiceError) as caught:
                client.score(images=[good, png_declaring(width, height)], ids=["ok", "bomb"])
            assert time.monotonic() - started < 1.0  # nothing was decoded
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details == (
                f"item 1 (id 'bomb'): the image declares {declared} pixels, over the server's "
                f"limit of {MAX_PIXELS:,} (--max-image-pixels): resize it before sending"
            )
            assert [v.field for v in caught.value.violations] == ["items[1].image"]

        # Each image is within the per-image limit; together they are over the request's.
        medium = png_bytes(Image.new("RGB", (300, 400), "white"))
        with pytest.raises(ScoringServiceError) as caught:
            client.score(images=[medium, medium, medium], ids=["a", "b", "c"])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details.startswith(
            "item 2 (id 'c'): the request's images declare 360,000 pixels up to this one, over "
            f"the server's limit of {MAX_REQUEST_PIXELS:,} per request (--max-request-pixels)"
        )
        assert len(client.score(images=[medium, medium])) == 2


def test_exif_orientation_is_applied():
    rng = np.random.default_rng(3)
    upright = Image.fromarray(rng.integers(0, 255, (20, 40, 3), np.uint8))  # 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a sideways phone camera
    sideways = png_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    limits = ImageLimits(2**20, MAX_PIXELS, MAX_REQUEST_PIXELS)
    decoded = decode_image(sideways, limits)
    assert decoded.size == (40, 20)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))


def test_decoding_does_not_block_the_event_loop(shapes, server, monkeypatch):
    _, images = shapes
    from bliss.server import scoring_service

    original = scoring_service.preprocessed_image

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring_service, "preprocessed_image", slow)
    registry = server.server.metrics.registry
    with BlissClient(server.address) as client:
        caller = threading.Thread(target=client.score, kwargs={"images": [images[0]]})
        caller.start()
        deadline = time.monotonic() + 10
        while registry.get_sample_value("bliss_inflight_requests") < 1:
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.01)
        started = time.monotonic()
        assert client.health() == "SERVING"
        assert client.index_info().label == "shapes@1"
        assert time.monotonic() - started < 0.5  # answered while the image decodes
        caller.join(timeout=20)


def test_graceful_shutdown_drains_an_in_flight_call(shapes):
    data, images = shapes
    # A long micro-batch wait keeps the call in flight while the shutdown starts.
    settings = server_settings(data, encode_batch_size=64, encode_max_delay_ms=1500)
    running = BackgroundServer(settings)
    address = running.address
    outcome: dict[str, object] = {}
    try:
        with BlissClient(address, max_retries=0) as client:

            def in_flight() -> None:
                outcome["items"] = client.score(images=[images[0]])

            caller = threading.Thread(target=in_flight)
            caller.start()
            deadline = time.monotonic() + 10
            registry = running.server.metrics.registry
            while registry.get_sample_value("bliss_inflight_requests") < 1:
                assert time.monotonic() < deadline, "the call never reached the server"
                time.sleep(0.01)
            stopper = threading.Thread(target=running.close, kwargs={"grace_s": 10, "delay_s": 0.5})
            stopper.start()
            time.sleep(0.2)  # inside the shutdown delay: health already says so
            assert client.health() == "NOT_SERVING"
            caller.join(timeout=20)
            stopper.join(timeout=20)
            assert not stopper.is_alive()
            assert len(outcome["items"]) == 1  # the in-flight call finished normally
            with pytest.raises(ScoringServiceError) as caught:
                client.score(images=[images[0]], timeout_s=5)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.close()
