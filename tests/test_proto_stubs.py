"""The checked-in stubs are exactly what protoc makes of the .proto files, and the API has
the shape clients rely on."""

from __future__ import annotations

import numpy as np

from bliss.v1 import generate, grpc_predict_v2_pb2, scorer_pb2


def test_generated_stubs_are_up_to_date():
    stale = generate.stale_stubs()
    assert stale == [], f"regenerate with `python -m bliss.v1.generate`: {stale} differ"


def test_the_service_and_its_messages():
    service = scorer_pb2.DESCRIPTOR.services_by_name["AnomalyScorer"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Score": (False, False),
        "ScoreStream": (True, True),
        "GetIndexInfo": (False, False),
        "ListIndexes": (False, False),
    }
    item = scorer_pb2.Item(id="x", embedding=scorer_pb2.Embedding(values=b"1234", dim=1))
    assert item.WhichOneof("input") == "embedding"
    item.image = b"png"
    assert item.WhichOneof("input") == "image"  # one input per item
    result = scorer_pb2.ScoreResult()
    assert not result.HasField("normal_quantile")
    result.normal_quantile = 0.0
    assert result.HasField("normal_quantile")  # 0.0 is a value, not "absent"
    options = scorer_pb2.ScoreOptions()
    assert not options.HasField("k") and not options.HasField("lambda_weight")


def test_embedding_bytes_are_little_endian_float32():
    vector = np.array([1.5, -2.0, 3.25], dtype="<f4")
    wire = scorer_pb2.Embedding(values=vector.tobytes(), dim=3).SerializeToString()
    decoded = scorer_pb2.Embedding.FromString(wire)
    assert decoded.values == b"\x00\x00\xc0?\x00\x00\x00\xc0\x00\x00P@"
    np.testing.assert_array_equal(np.frombuffer(decoded.values, "<f4"), vector)


def test_the_vendored_open_inference_protocol():
    """grpc_predict_v2.proto is KServe's text: package `inference`, so the service path is the
    one Triton and KServe clients call; its stubs are among those checked above."""
    assert {"grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"} <= {
        path.name for path in generate.stub_paths(generate.PACKAGE_DIR)
    }
    assert (
        "Licensed under the Apache License"
        in (generate.PACKAGE_DIR / "grpc_predict_v2.proto").read_text()
    )
    service = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer"} <= {
        method.name for method in service.methods
    }
