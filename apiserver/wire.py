"""The apiserver's services registered so that data skips protobuf's copies.

A data response (rune/protowire.py) is encoded with one copy of its payload; protobuf
would copy it into the message and again into the serialization. The generated
add_*_to_server functions are given a registrar that wraps every response serializer:
bytes pass through as they are, messages are serialized as before. An upload's data
requests are read as views into the received bytes (COPY_PARSERS).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from rune.proto import exec_pb2 as pb
from rune.protowire import COPY_REQUEST_DATA_TAG, passing, view_parser


class Registrar:
    """What the generated add_*_to_server functions call, in front of the real server.

    They pass one handler dict to both calls. The registered handlers take precedence
    over the generic ones (grpc.aio.Server.add_registered_method_handlers): those get
    the wrapped serializers; the generic ones stay as generated."""

    def __init__(self, server: grpc.aio.Server,
                 parsers: dict[str, Callable[[bytes], object]] | None = None) -> None:
        self.server = server
        self.parsers = parsers or {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(service, {
            name: h._replace(response_serializer=passing(h.response_serializer),
                             request_deserializer=self.parsers.get(name,
                                                                   h.request_deserializer))
            for name, h in handlers.items()})


def register(add_to_server: Callable[[object, object], None], servicer: object,
             server: grpc.aio.Server,
             parsers: dict[str, Callable[[bytes], object]] | None = None) -> None:
    """add_to_server(servicer, server), with response serializers that pass bytes and,
    for the methods named in PARSERS, their request deserializers."""
    add_to_server(servicer, Registrar(server, parsers))


# An upload's data requests are read as views (rune/protowire.py).
COPY_PARSERS = {"StreamCopy": view_parser(pb.CopyRequest, {COPY_REQUEST_DATA_TAG: "data"},
                                          False)}
