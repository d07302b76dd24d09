"""gRPC server reflection (grpcurl, Postman, ...), off unless ``--reflection`` is given.

grpcio-reflection implements only ``grpc.reflection.v1alpha``; current tools ask for
``grpc.reflection.v1`` first. The two protocols are the same messages under another
package name, so v1 is served by the same servicer with v1alpha's (wire-identical)
message classes, and v1's file descriptor is added to the descriptor pool so that
reflection can describe itself under both names.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1ALPHA_PREFIX = ".grpc.reflection.v1alpha."
_V1_PREFIX = ".grpc.reflection.v1."


def enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Serve both reflection versions, listing ``services`` and themselves."""
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.aio.ReflectionServicer((*services, V1_SERVICE, V1ALPHA_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """grpc/reflection/v1/reflection.proto, derived from v1alpha's (once per process)."""
    try:
        pool.FindServiceByName(V1_SERVICE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's Java and Go package names
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # message-typed fields only
                field.type_name = field.type_name.replace(_V1ALPHA_PREFIX, _V1_PREFIX)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(_V1ALPHA_PREFIX, _V1_PREFIX)
            method.output_type = method.output_type.replace(_V1ALPHA_PREFIX, _V1_PREFIX)
    pool.AddSerializedFile(proto.SerializeToString())
