"""Property-based fuzzing of the request surface: whatever a caller sends (random ids,
NaN/inf/zero/huge embeddings of any dimension, any K, lambda and mode, hostile image
bytes, bytes that are no message at all), the server answers OK with finite numbers or
a status that blames the request, never UNKNOWN or INTERNAL, and keeps serving."""

from __future__ import annotations

import io
import math
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from bliss.client import BlissClient
from bliss.encoders import TINY_TEST_MODEL
from bliss.server.runtime import BackgroundServer
from bliss.synthetic_images import write_shape_folders
from bliss.v1 import scorer_pb2, scorer_pb2_grpc
from tests.cli_runner import run_cli
from tests.serving_fixtures import server_settings
from tests.test_server_images import png_declaring

MAX_ITEMS = 6
WORDS = ["cat", "dog", "circle", "box", "star", "tree", "wheel", "sign", "roof", "kite", "moon"]
# The request's fault, or a limit it hit: everything a caller may legitimately get back.
CALLER_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Bounded so the whole module runs in well under 30 s on two cores; derandomized so a
# failure reproduces (and CI sees the same examples as a developer).
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A tiny-model index that takes both images and embeddings."""
    root = tmp_path_factory.mktemp("fuzz")
    write_shape_folders(root / "normal", ["circle", "square"], 3, seed=4, size=32)
    words = root / "words.txt"
    words.write_text("".join(f"{w}\n" for w in WORDS))
    built = run_cli(
        "index", "build", "--name", "shapes", "--from-images", root / "normal",
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--activate",
        data_dir=root / "data",
    )  # fmt: skip
    assert built.code == 0, built.stderr
    settings_ = server_settings(
        root / "data", max_batch_items=MAX_ITEMS, max_image_pixels=50_000, max_image_mib=0.5
    )
    with BackgroundServer(settings_) as running:
        channel = grpc.insecure_channel(running.address)
        with BlissClient(running.address) as client:
            dim = client.index_info().embedding_dim
        yield running, scorer_pb2_grpc.AnomalyScorerStub(channel), channel, dim
        channel.close()


def _image_file(format: str) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


VALID_IMAGES = [_image_file(f) for f in ("PNG", "JPEG", "GIF", "WEBP")]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "truncated", "declared", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "declared":
        side = st.integers(1, 2**31 - 1)
        return png_declaring(draw(side), draw(side))
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def embedding(draw: st.DrawFn, dim: int) -> scorer_pb2.Embedding:
    size = draw(st.sampled_from([dim, dim, dim, 0, 1, dim - 1, dim + 1, 4096]))
    kind = draw(st.sampled_from(["random", "zeros", "tiny", "huge", "unit", "bytes"]))
    if kind == "bytes":
        values = draw(st.binary(max_size=4 * dim + 8))
        return scorer_pb2.Embedding(values=values, dim=draw(st.integers(0, 2**32 - 1)))
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    vector = draw(hnp.arrays(np.float32, size, elements=floats))
    if kind == "zeros":
        vector = np.zeros(size, np.float32)
    elif kind == "tiny":
        vector = np.full(size, 1e-30, np.float32)
    elif kind == "huge":
        vector = np.full(size, 3e38, np.float32)
    elif kind == "unit":
        vector = np.ones(size, np.float32)
    declared = draw(st.sampled_from([size, size, dim, size + 1]))
    return scorer_pb2.Embedding(values=vector.astype("<f4").tobytes(), dim=max(0, declared))


item_ids = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.sampled_from(["", "x" * 100_000, "é/../../etc/passwd", "\x00\n\t"]),
)


@st.composite
def score_request(draw: st.DrawFn, dim: int) -> scorer_pb2.ScoreRequest:
    """Items are well formed half the time and each option is wild or not on its own, so
    that every path is reached: scoring, and each refusal by itself."""
    clean = draw(st.booleans())
    wild = draw(st.sets(st.sampled_from(["index", "mode", "k", "lambda"])))
    items = []
    for _ in range(draw(st.integers(1 if clean else 0, MAX_ITEMS if clean else MAX_ITEMS + 1))):
        item = scorer_pb2.Item(id=draw(item_ids))
        kind = draw(st.sampled_from(["good", "good", "embedding", "image", "none"]))
        if clean or kind == "good":
            if draw(st.booleans()):
                vector = draw(hnp.arrays(np.float32, dim, elements=st.floats(-1, 1, width=32)))
                vector[0] = 1  # never too small to have a direction
                item.embedding.CopyFrom(scorer_pb2.Embedding(values=vector.tobytes(), dim=dim))
            else:
                item.image = draw(st.sampled_from(VALID_IMAGES))
        elif kind == "embedding":
            item.embedding.CopyFrom(draw(embedding(dim)))
        elif kind == "image":
            item.image = draw(image_bytes())
        items.append(item)
    indexes = ["", "shapes", "nope", "x" * 999] if "index" in wild else ["", "shapes"]
    options = scorer_pb2.ScoreOptions(
        index=draw(st.sampled_from(indexes)),
        mode=draw(st.integers(-3, 6) if "mode" in wild else st.integers(0, 3)),
        return_class_scores=draw(st.booleans()),
        return_top_entries=draw(st.booleans()),
    )
    wild_k = st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))
    k = draw(st.one_of(st.none(), wild_k if "k" in wild else st.integers(1, len(WORDS))))
    if k is not None:
        options.k = k
    extreme = st.sampled_from([1.7976931348623157e308, -1e308, 1e7, -1.0, 5e-324, -0.0])
    wild_lam = st.one_of(st.floats(), extreme)
    lam = draw(st.one_of(st.none(), wild_lam if "lambda" in wild else st.floats(0, 3)))
    if lam is not None:
        options.lambda_weight = lam
    return scorer_pb2.ScoreRequest(items=items, options=options)


def assert_finite(response: Message) -> None:
    for result in getattr(response, "results", ()):
        numbers = [result.score, result.internal_class_score, result.external_text_score]
        numbers += list(result.class_scores) + [e.similarity for e in result.top_entries]
        if result.HasField("normal_quantile"):
            numbers.append(result.normal_quantile)
        assert all(math.isfinite(n) for n in numbers), result


def outcome(call) -> grpc.StatusCode:
    try:
        response = call()
    except grpc.RpcError as error:
        assert error.code() in CALLER_CODES, (error.code(), error.details())
        assert len(error.details()) < 2000
        return error.code()
    for message in response if isinstance(response, list) else [response]:
        assert_finite(message)
    return grpc.StatusCode.OK


def test_any_score_request_is_answered_ok_or_blamed_on_the_caller(fuzz_server):
    server, stub, _, dim = fuzz_server
    seen: Counter[grpc.StatusCode] = Counter()

    @FUZZ
    @given(request=score_request(dim))
    def check(request: scorer_pb2.ScoreRequest) -> None:
        code = outcome(lambda: stub.Score(request, timeout=30))
        seen[code] += 1
        if request.options.HasField("lambda_weight"):
            lam = request.options.lambda_weight
            if not (math.isfinite(lam) and 0 <= lam <= 1e6):
                assert code != grpc.StatusCode.OK, f"lambda={lam} was accepted"

    check()
    # Both the scoring path and the refusals were exercised, not only one of them.
    assert seen[grpc.StatusCode.OK] >= 20 and seen[grpc.StatusCode.INVALID_ARGUMENT] >= 20
    assert_still_serving(server, stub, dim)


def test_any_bytes_are_answered_without_unknown_or_internal(fuzz_server):
    server, stub, channel, dim = fuzz_server
    methods = [
        channel.unary_unary(f"/bliss.v1.AnomalyScorer/{name}", response_deserializer=parse)
        for name, parse in (
            ("Score", scorer_pb2.ScoreResponse.FromString),
            ("GetIndexInfo", scorer_pb2.IndexInfo.FromString),
            ("ListIndexes", scorer_pb2.ListIndexesResponse.FromString),
        )
    ]
    stream = channel.stream_stream(
        "/bliss.v1.AnomalyScorer/ScoreStream",
        response_deserializer=scorer_pb2.ScoreResponse.FromString,
    )

    @FUZZ
    @given(body=st.binary(max_size=300), method=st.integers(0, 3))
    def check(body: bytes, method: int) -> None:
        if method == 3:
            outcome(lambda: list(stream(iter([body, body]), timeout=30)))
        else:
            outcome(lambda: methods[method](body, timeout=30))

    check()
    assert_still_serving(server, stub, dim)


def assert_still_serving(server: BackgroundServer, stub, dim: int) -> None:
    with BlissClient(server.address) as client:
        assert client.health() == "SERVING"
        rows = np.random.default_rng(1).normal(size=(2, dim)).astype(np.float32)
        assert len(client.score(embeddings=rows, images=[VALID_IMAGES[0]])) == 3
    registry = server.server.metrics.registry
    for method in ("Score", "ScoreStream", "GetIndexInfo", "ListIndexes"):
        for code in ("UNKNOWN", "INTERNAL"):
            assert not registry.get_sample_value(
                "bliss_errors_total", {"method": method, "code": code}
            ), (method, code)
