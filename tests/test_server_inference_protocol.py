"""The Open Inference Protocol (KServe v2 gRPC) called with tritonclient: health, model
metadata, ModelInfer with embeddings and images giving the native API's scores, the
parameters, bad requests, and the bearer token.

tritonclient.grpc registers its own copy of the ``inference.*`` messages in protobuf's
default pool, which refuses the server's vendored copy in the same process, so the client
calls run in a child process (:func:`triton_calls`) and come back as JSON.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from bliss.client import BlissClient
from bliss.encoders import TINY_TEST_MODEL
from bliss.server.runtime import BackgroundServer
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli
from tests.serving_fixtures import server_settings

MAX_K = 6
TOKEN = "oip-token"
WORDS = ["cat", "dog", "circle", "box", "star", "tree", "wheel", "sign", "roof", "kite"]
OUTPUTS = ["SCORE", "NEAREST_CLASS", "IC_SCORE", "ET_SCORE", "NORMAL_QUANTILE"]

# Runs in the child: reads {"url", "token", "calls"} on stdin, prints one result per call.
_CLIENT = r"""
import base64, json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

plan = json.load(sys.stdin)
client = triton.InferenceServerClient(plan["url"])
headers = {"authorization": f"Bearer {plan['token']}"} if plan["token"] else None

def infer(call):
    if "embeddings" in call:
        data = np.asarray(call["embeddings"], dtype=call.get("dtype", "float32"))
        tensor = triton.InferInput("EMBEDDINGS", list(data.shape), call.get("datatype", "FP32"))
    else:
        data = np.array([base64.b64decode(i) for i in call["images"]], dtype=np.object_)
        tensor = triton.InferInput("IMAGES", [len(data)], "BYTES")
    tensor.set_data_from_numpy(data)
    outputs = [triton.InferRequestedOutput(name) for name in call.get("outputs", [])]
    result = client.infer(call["model"], [tensor], outputs=outputs or None,
                          parameters=call.get("parameters"), headers=headers)
    response = result.get_response()
    arrays = {output.name: result.as_numpy(output.name) for output in response.outputs}
    return {
        "model_version": response.model_version,
        "outputs": {
            name: [v.decode() if isinstance(v, bytes) else float(v) for v in array.tolist()]
            for name, array in arrays.items()
        },
        "shapes": {output.name: list(output.shape) for output in response.outputs},
    }

def run(call):
    op = call["op"]
    if op == "live":
        return client.is_server_live(headers=headers)
    if op == "ready":
        return client.is_server_ready(headers=headers)
    if op == "model_ready":
        return client.is_model_ready(call["model"], headers=headers)
    if op == "metadata":
        metadata = client.get_model_metadata(call["model"], headers=headers, as_json=True)
        return {
            key: [[t["name"], t["datatype"], [int(s) for s in t["shape"]]] for t in metadata[key]]
            for key in ("inputs", "outputs")
        } | {"name": metadata["name"], "versions": metadata["versions"]}
    return infer(call)

results = []
for call in plan["calls"]:
    try:
        results.append({"ok": run(call)})
    except InferenceServerException as error:
        results.append({"status": error.status(), "message": error.message()})
print(json.dumps(results))
"""


def triton_calls(address: str, calls: list[dict], token: str = "") -> list[dict]:
    plan = json.dumps({"url": address, "token": token, "calls": calls})
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT], input=plan, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ok(result: dict):
    assert "ok" in result, result
    return result["ok"]


def refused(result: dict, code: str) -> str:
    assert result.get("status") == f"StatusCode.{code}", result
    return result["message"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """An active, calibrated tiny-model index 'shapes' and a few test images."""
    root = tmp_path_factory.mktemp("shapes")
    write_shape_folders(root / "normal", ["circle", "square", "triangle"], 5, seed=1)
    tests = write_shape_folders(root / "test", ["circle", "cross"], 2, seed=2)
    words = root / "words.txt"
    words.write_text("".join(f"{w}\n" for w in WORDS))
    data = root / "data"
    built = run_cli(
        "index", "build", "--name", "shapes", "--from-images", root / "normal",
        "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--activate",
        "--default-k", "4", "--calibration-fraction", "0.3", data_dir=data,
    )  # fmt: skip
    assert built.code == 0, built.stderr
    return data, [path.read_bytes() for paths in tests.values() for path in paths]


@pytest.fixture(scope="module")
def server(shapes):
    data, _ = shapes
    with BackgroundServer(server_settings(data, max_k=MAX_K)) as background:
        yield background


@pytest.fixture(scope="module")
def native(server):
    with BlissClient(server.address) as client:
        yield client


def native_outputs(items) -> dict[str, list]:
    return {
        "SCORE": [i.score for i in items],
        "NEAREST_CLASS": [i.nearest_class for i in items],
        "IC_SCORE": [i.internal_class_score for i in items],
        "ET_SCORE": [i.external_text_score for i in items],
        "NORMAL_QUANTILE": [i.normal_quantile for i in items],
    }


def assert_same_outputs(remote: dict, items, names=OUTPUTS) -> None:
    expected = native_outputs(items)
    assert sorted(remote) == sorted(names)
    for name in names:
        if name == "NEAREST_CLASS":
            assert remote[name] == expected[name]
        else:
            np.testing.assert_allclose(remote[name], expected[name], rtol=1e-12)


def test_health_and_metadata(server):
    dim = server.server.registry.resolve("shapes").scorer.dim
    live, ready, model, unknown, metadata, missing = triton_calls(
        server.address,
        [
            {"op": "live"},
            {"op": "ready"},
            {"op": "model_ready", "model": "shapes"},
            {"op": "model_ready", "model": "nope"},
            {"op": "metadata", "model": "shapes"},
            {"op": "metadata", "model": "nope"},
        ],
    )
    assert ok(live) is True and ok(ready) is True
    assert ok(model) is True and ok(unknown) is False
    assert ok(metadata) == {
        "name": "shapes",
        "versions": ["1"],
        "inputs": [["EMBEDDINGS", "FP32", [-1, dim]], ["IMAGES", "BYTES", [-1]]],
        "outputs": [
            [name, "BYTES" if name == "NEAREST_CLASS" else "FP64", [-1]] for name in OUTPUTS
        ],
    }
    assert "no active index is named 'nope'" in refused(missing, "NOT_FOUND")


def test_embeddings_and_images_score_as_the_native_api(server, native, shapes):
    _, images = shapes
    dim = server.server.registry.resolve("shapes").scorer.dim
    embeddings = np.random.default_rng(3).standard_normal((5, dim)).astype(np.float32)
    encoded = [base64.b64encode(image).decode() for image in images]
    by_embedding, by_image, chosen = triton_calls(
        server.address,
        [
            {"op": "infer", "model": "shapes", "embeddings": embeddings.tolist()},
            {"op": "infer", "model": "shapes", "images": encoded},
            {
                "op": "infer",
                "model": "shapes",
                "embeddings": embeddings.tolist(),
                "outputs": ["NEAREST_CLASS", "SCORE"],
            },
        ],
    )
    expected = native.score(embeddings=embeddings, index="shapes")
    assert ok(by_embedding)["model_version"] == "1"
    assert ok(by_embedding)["shapes"] == {name: [5] for name in OUTPUTS}
    assert_same_outputs(ok(by_embedding)["outputs"], expected)
    assert_same_outputs(ok(by_image)["outputs"], native.score(images=images, index="shapes"))
    assert_same_outputs(ok(chosen)["outputs"], expected, ["NEAREST_CLASS", "SCORE"])


def test_parameters_are_honoured(server, native):
    dim = server.server.registry.resolve("shapes").scorer.dim
    embeddings = np.random.default_rng(4).standard_normal((3, dim)).astype(np.float32)
    outputs = ["SCORE", "NEAREST_CLASS", "IC_SCORE", "ET_SCORE"]
    chosen = [
        ({"k": 2}, {"k": 2}),
        ({"lambda": 0.25}, {"lam": 0.25}),
        ({"mode": "ic"}, {"mode": "ic"}),
        ({"mode": "ic_raw", "k": 3, "lambda": 2.0}, {"mode": "ic_raw", "k": 3, "lam": 2.0}),
    ]
    results = triton_calls(
        server.address,
        [
            {
                "op": "infer",
                "model": "shapes",
                "embeddings": embeddings.tolist(),
                "parameters": parameters,
                "outputs": outputs,
            }
            for parameters, _ in chosen
        ],
    )
    default = native.score(embeddings=embeddings, index="shapes")
    for result, (_, options) in zip(results, chosen, strict=True):
        expected = native.score(embeddings=embeddings, index="shapes", **options)
        assert [i.score for i in expected] != [i.score for i in default]
        assert_same_outputs(ok(result)["outputs"], expected, outputs)


def test_bad_requests(server):
    dim = server.server.registry.resolve("shapes").scorer.dim
    row = [[0.5] * dim]
    wrong_dim, wrong_dtype, unknown, over_k, bad_mode, extra, quantile_at_other_k = triton_calls(
        server.address,
        [
            {"op": "infer", "model": "shapes", "embeddings": [[0.5] * (dim + 1)]},
            {
                "op": "infer",
                "model": "shapes",
                "embeddings": row,
                "dtype": "float64",
                "datatype": "FP64",
            },
            {"op": "infer", "model": "nope", "embeddings": row},
            {"op": "infer", "model": "shapes", "embeddings": row, "parameters": {"k": MAX_K + 1}},
            {"op": "infer", "model": "shapes", "embeddings": row, "parameters": {"mode": "x"}},
            {"op": "infer", "model": "shapes", "embeddings": row, "parameters": {"topk": 2}},
            {
                "op": "infer",
                "model": "shapes",
                "embeddings": row,
                "parameters": {"k": 1},
                "outputs": ["NORMAL_QUANTILE"],
            },
        ],
    )
    assert f"takes {dim}-dimensional float32" in refused(wrong_dim, "INVALID_ARGUMENT")
    assert "send FP32 [B, D]" in refused(wrong_dtype, "INVALID_ARGUMENT")
    assert "no active index is named 'nope'" in refused(unknown, "NOT_FOUND")
    assert f"over the server's limit of {MAX_K}" in refused(over_k, "INVALID_ARGUMENT")
    assert "must be one of bliss, ic, ic_raw" in refused(bad_mode, "INVALID_ARGUMENT")
    assert "unknown parameter" in refused(extra, "INVALID_ARGUMENT")
    assert "NORMAL_QUANTILE is not available" in refused(quantile_at_other_k, "INVALID_ARGUMENT")


def test_a_token_protected_server_refuses_calls_without_it(shapes):
    data, _ = shapes
    settings = server_settings(data, auth_token=TOKEN)
    with BackgroundServer(settings) as server:
        dim = server.server.registry.resolve("shapes").scorer.dim
        calls = [
            {"op": "ready"},
            {"op": "infer", "model": "shapes", "embeddings": [[0.5] * dim]},
        ]
        without = triton_calls(server.address, calls)
        wrong = triton_calls(server.address, calls, token="wrong")
        with_token = triton_calls(server.address, calls, token=TOKEN)
    assert "requires a token" in refused(without[0], "UNAUTHENTICATED")
    assert "requires a token" in refused(without[1], "UNAUTHENTICATED")
    assert refused(wrong[1], "UNAUTHENTICATED") == "wrong bearer token"
    assert ok(with_token[0]) is True
    assert len(ok(with_token[1])["outputs"]["SCORE"]) == 1
