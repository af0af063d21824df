"""gRPC server reflection under both names clients ask for: `grpc.reflection.v1` (grpcurl,
buf curl, Postman and grpc-java ask for it first) and `grpc.reflection.v1alpha`.

grpcio-reflection (1.85) implements only v1alpha (grpc/grpc#38576 asks for v1). The v1
protocol is v1alpha promoted unchanged: the same messages with the same field numbers
and types in another package (grpc-proto's `grpc/reflection/v1/reflection.proto`). So
one servicer answers both names: v1 is a second service whose method reads and writes
those same bytes. So that a client can also describe the v1 service itself, its
descriptor goes into the default pool as v1alpha's file moved to the v1 package.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

V1ALPHA_SERVICE: str = v1alpha.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
#: The canonical file name of the v1 protocol (grpc-proto).
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_METHOD = "ServerReflectionInfo"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds the v1 protocol's file to `pool` unless something registered it already."""
    try:
        pool.FindFileContainingSymbol(V1_SERVICE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    alpha = f".{v1alpha_pb2.DESCRIPTOR.package}."
    proto.name = _V1_FILE
    proto.package = V1_PACKAGE
    # v1alpha's file is marked deprecated and names its own Java/Go packages; v1's are these.
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages only: scalars must not carry one
                field.type_name = field.type_name.replace(alpha, f".{V1_PACKAGE}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(alpha, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(alpha, f".{V1_PACKAGE}.")
    pool.Add(proto)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection on `server` as v1 and v1alpha, listing `service_names` and both
    reflection services."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = v1alpha.aio.ReflectionServicer(names, pool=pool)
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {_METHOD: v1_handler}),)
    )
