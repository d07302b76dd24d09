"""The Open Inference Protocol (KServe v2 gRPC, ``inference.GRPCInferenceService``) as a
second front end of the scorer: each active index is a model named after it.

A ModelInferRequest is translated into the native :class:`bliss.v1.scorer_pb2.ScoreRequest`
and scored by :meth:`AnomalyScorerService.score`, inside its :meth:`~AnomalyScorerService.serving`
block, so both front ends share one path: validation, budgets (items, K, pixels, response
size), micro-batching and fair scheduling, metrics, and errors mapped to gRPC statuses.
Only the tensor framing is checked here. Like the native service, the handlers take raw
bytes, so nothing is parsed before the bearer-token interceptor has passed the call.

Outputs always go in ``raw_output_contents`` (as Triton answers): tritonclient's
``InferResult.as_numpy`` reads numeric outputs from there only.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf.message import Message

from bliss.errors import BlissError, NotFoundError
from bliss.scoring import ScoringMode
from bliss.scoring_options import PROTO_MODES
from bliss.server.error_details import BadRequestError, FieldViolation
from bliss.server.index_registry import IndexRegistry, ServedIndex
from bliss.server.scoring_requests import parse_message
from bliss.server.scoring_service import AnomalyScorerService
from bliss.v1 import grpc_predict_v2_pb2 as v2
from bliss.v1 import scorer_pb2

INFERENCE_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EMBEDDINGS = "EMBEDDINGS"
IMAGES = "IMAGES"
_UINT32_MAX = 2**32 - 1
_FP32 = np.dtype("<f4")
_FP64 = np.dtype("<f8")
_LENGTH = struct.Struct("<I")  # BYTES elements are framed by a little-endian uint32 length

# Output name -> (datatype, ScoreResult field).
OUTPUTS = {
    "SCORE": ("FP64", "score"),
    "NEAREST_CLASS": ("BYTES", "nearest_class"),
    "IC_SCORE": ("FP64", "internal_class_score"),
    "ET_SCORE": ("FP64", "external_text_score"),
    "NORMAL_QUANTILE": ("FP64", "normal_quantile"),
}

_Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]


class InferenceProtocolService:
    def __init__(self, scorer: AnomalyScorerService, registry: IndexRegistry) -> None:
        self._scorer = scorer
        self._registry = registry

    def method_handlers(self) -> grpc.GenericRpcHandler:
        """The methods a scoring server can answer; the others are UNIMPLEMENTED."""
        handlers: dict[str, tuple[_Handler, type[Message]]] = {
            "ServerLive": (self.ServerLive, v2.ServerLiveResponse),
            "ServerReady": (self.ServerReady, v2.ServerReadyResponse),
            "ModelReady": (self.ModelReady, v2.ModelReadyResponse),
            "ModelMetadata": (self.ModelMetadata, v2.ModelMetadataResponse),
            "ModelInfer": (self.ModelInfer, v2.ModelInferResponse),
        }
        return grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    handler, response_serializer=response.SerializeToString
                )
                for name, (handler, response) in handlers.items()
            },
        )

    async def ServerLive(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> v2.ServerLiveResponse:
        async with self._scorer.serving(context, "ServerLive"):
            parse_message(raw, v2.ServerLiveRequest)
            return v2.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> v2.ServerReadyResponse:
        async with self._scorer.serving(context, "ServerReady"):
            parse_message(raw, v2.ServerReadyRequest)
            served = self._registry.served_indexes()
            return v2.ServerReadyResponse(
                ready=any(self._ready(s.version.name, "") for s in served)
            )

    async def ModelReady(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> v2.ModelReadyResponse:
        async with self._scorer.serving(context, "ModelReady"):
            request = parse_message(raw, v2.ModelReadyRequest)
            return v2.ModelReadyResponse(ready=self._ready(request.name, request.version))

    async def ModelMetadata(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> v2.ModelMetadataResponse:
        async with self._scorer.serving(context, "ModelMetadata"):
            request = parse_message(raw, v2.ModelMetadataRequest)
            return model_metadata(self._resolve(request.name, request.version))

    async def ModelInfer(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> v2.ModelInferResponse:
        async with self._scorer.serving(context, "ModelInfer"):
            request = parse_message(raw, v2.ModelInferRequest)
            if request.model_version:
                self._resolve(request.model_name, request.model_version)
            names = requested_outputs(request)
            response = await self._scorer.score(score_request(request))
            return infer_response(request, names, response)

    def _resolve(self, name: str, version: str) -> ServedIndex:
        served = self._registry.resolve(name)
        if version and version != str(served.version.version):
            raise NotFoundError(
                f"model {served.version.name!r} serves version {served.version.version}, "
                f"not {version!r}"
            )
        return served

    def _ready(self, name: str, version: str) -> bool:
        """Whether ``name`` would be scored now (the checks of a request, no scoring)."""
        try:
            self._resolve(name, version)
        except BlissError:
            return False
        return True


def model_metadata(served: ServedIndex) -> v2.ModelMetadataResponse:
    """Inputs the index accepts; outputs it can give (NORMAL_QUANTILE when calibrated)."""
    tensor = v2.ModelMetadataResponse.TensorMetadata
    inputs = [tensor(name=EMBEDDINGS, datatype="FP32", shape=[-1, served.scorer.dim])]
    if served.images is not None:
        inputs.append(tensor(name=IMAGES, datatype="BYTES", shape=[-1]))
    outputs = [
        tensor(name=name, datatype=datatype, shape=[-1])
        for name, (datatype, _) in OUTPUTS.items()
        if name != "NORMAL_QUANTILE" or served.scorer.calibration is not None
    ]
    return v2.ModelMetadataResponse(
        name=served.version.name,
        versions=[str(served.version.version)],
        platform="bliss",
        inputs=inputs,
        outputs=outputs,
    )


def requested_outputs(request: v2.ModelInferRequest) -> list[str]:
    """The outputs asked for, in order (none asked: all the response has)."""
    names = [output.name for output in request.outputs]
    for position, name in enumerate(names):
        if name not in OUTPUTS:
            raise BadRequestError(
                f"unknown output {name!r}: the outputs are {', '.join(OUTPUTS)}",
                [FieldViolation(f"outputs[{position}].name", "must be a model output")],
            )
    return names


def score_request(request: v2.ModelInferRequest) -> scorer_pb2.ScoreRequest:
    """The native request for an inference request: one item per row of its one input."""
    if len(request.inputs) != 1:
        raise BadRequestError(
            f"the request has {len(request.inputs)} inputs: send exactly one, "
            f"{EMBEDDINGS} (FP32 [B, D]) or {IMAGES} (BYTES [B])",
            [FieldViolation("inputs", "must hold exactly one tensor")],
        )
    tensor = request.inputs[0]
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if tensor.name == EMBEDDINGS:
        items = [
            scorer_pb2.Item(embedding=scorer_pb2.Embedding(values=row.tobytes(), dim=row.size))
            for row in _embedding_rows(tensor, raw)
        ]
    elif tensor.name == IMAGES:
        items = [scorer_pb2.Item(image=image) for image in _image_elements(tensor, raw)]
    else:
        raise BadRequestError(
            f"unknown input {tensor.name!r}: send {EMBEDDINGS} or {IMAGES}",
            [FieldViolation("inputs[0].name", f"must be {EMBEDDINGS} or {IMAGES}")],
        )
    options = scoring_options(request.parameters)
    options.index = request.model_name
    return scorer_pb2.ScoreRequest(items=items, options=options)


def scoring_options(parameters: dict[str, v2.InferParameter]) -> scorer_pb2.ScoreOptions:
    """``k``, ``lambda`` and ``mode``; their ranges are checked with the native options."""
    options = scorer_pb2.ScoreOptions()
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "k" and kind in ("int64_param", "uint64_param"):
            k = getattr(value, kind)
            if not 0 <= k <= _UINT32_MAX:
                raise _parameter_error("k", f"K={k} must be a positive integer")
            options.k = k
        elif key == "lambda" and kind in ("double_param", "int64_param"):
            options.lambda_weight = getattr(value, kind)
        elif key == "mode" and kind == "string_param":
            try:
                options.mode = PROTO_MODES[ScoringMode(value.string_param.lower())]
            except ValueError:
                # PROTO_MODES order (bliss first), as the docs list the modes.
                names = ", ".join(mode.value for mode in PROTO_MODES)
                raise _parameter_error("mode", f"must be one of {names}") from None
        elif key in ("k", "lambda", "mode"):
            raise _parameter_error(key, f"{key} cannot be a {kind}")
        else:
            raise _parameter_error(key, "unknown parameter: the parameters are k, lambda, mode")
    return options


def infer_response(
    request: v2.ModelInferRequest, names: list[str], response: scorer_pb2.ScoreResponse
) -> v2.ModelInferResponse:
    """The native response as output tensors, each in ``raw_output_contents``."""
    results = response.results
    calibrated = bool(results) and results[0].HasField("normal_quantile")
    if not names:
        names = [name for name in OUTPUTS if name != "NORMAL_QUANTILE" or calibrated]
    elif "NORMAL_QUANTILE" in names and not calibrated:
        raise BadRequestError(
            "NORMAL_QUANTILE is not available: the model is not calibrated, or not for the "
            "request's mode, K and lambda",
            [FieldViolation("outputs", "drop NORMAL_QUANTILE")],
        )
    label = results[0].index_version if results else ""
    inferred = v2.ModelInferResponse(
        model_name=label.rpartition("@")[0] or request.model_name,
        model_version=label.rpartition("@")[2],
        id=request.id,
    )
    for name in names:
        datatype, field = OUTPUTS[name]
        values = [getattr(result, field) for result in results]
        inferred.outputs.add(name=name, datatype=datatype, shape=[len(results)])
        if datatype == "BYTES":
            encoded = [value.encode() for value in values]
            raw = b"".join(_LENGTH.pack(len(value)) + value for value in encoded)
        else:
            raw = np.asarray(values, dtype=_FP64).tobytes()
        inferred.raw_output_contents.append(raw)
    return inferred


def _embedding_rows(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    # D >= 1 bounds B by the message size: [10**9, 0] would be a billion empty items.
    if tensor.datatype != "FP32" or len(tensor.shape) != 2 or tensor.shape[1] < 1:
        raise BadRequestError(
            f"{EMBEDDINGS} is {tensor.datatype} {list(tensor.shape)}: send FP32 [B, D] "
            "(D the model's embedding dimension, see ModelMetadata)",
            [FieldViolation("inputs[0]", "must be FP32 with shape [B, D]")],
        )
    rows, dim = tensor.shape
    if rows < 0:
        raise _contents_error(f"{rows} rows", "a batch size of 0 or more")
    if raw is not None:
        if len(raw) != rows * dim * _FP32.itemsize:
            raise _contents_error(f"{len(raw)} bytes", f"{rows * dim * _FP32.itemsize}")
        values = np.frombuffer(raw, dtype=_FP32)
    else:
        values = np.asarray(tensor.contents.fp32_contents, dtype=_FP32)
        if values.size != rows * dim:
            raise _contents_error(f"{values.size} FP32 values", f"{rows * dim}")
    return values.reshape(rows, dim)


def _image_elements(
    tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> list[bytes]:
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise BadRequestError(
            f"{IMAGES} is {tensor.datatype} {list(tensor.shape)}: send BYTES [B], one "
            "encoded image file per element",
            [FieldViolation("inputs[0]", "must be BYTES with shape [B]")],
        )
    images = list(tensor.contents.bytes_contents) if raw is None else _split_bytes(raw)
    if len(images) != tensor.shape[0]:
        raise _contents_error(f"{len(images)} elements", str(tensor.shape[0]))
    return images


def _split_bytes(raw: bytes) -> list[bytes]:
    """A raw BYTES tensor: each element its uint32 length, then its bytes."""
    elements = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise _contents_error("a truncated length prefix", "whole elements")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise _contents_error(f"an element of {size} bytes past the end", "whole elements")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def _contents_error(found: str, expected: str) -> BadRequestError:
    return BadRequestError(
        f"the input's contents hold {found} where its datatype and shape call for {expected}",
        [FieldViolation("inputs[0].contents", "must match the datatype and shape")],
    )


def _parameter_error(key: str, problem: str) -> BadRequestError:
    return BadRequestError(
        f"parameter {key!r}: {problem}", [FieldViolation(f"parameters[{key}]", problem)]
    )
