"""The apiserver's services registered so that a handler may write pre-encoded bytes.

A data response (rune/protowire.py) is encoded with one copy of its payload; protobuf
would copy it into the message and again into the serialization. The generated
add_*_to_server functions are given a registrar that wraps every response serializer:
bytes pass through as they are, messages are serialized as before.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc


def _passing(serialize: Callable[[object], bytes] | None) -> Callable[[object], bytes]:
    def serializer(message: object) -> bytes:
        if type(message) is bytes:
            return message
        return serialize(message) if serialize is not None else message

    return serializer


class Registrar:
    """What the generated add_*_to_server functions call, in front of the real server.

    They pass one handler dict to both calls. The registered handlers take precedence
    over the generic ones (grpc.aio.Server.add_registered_method_handlers): those get
    the wrapped serializers; the generic ones stay as generated."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(service, {
            name: h._replace(response_serializer=_passing(h.response_serializer))
            for name, h in handlers.items()})


def register(add_to_server: Callable[[object, object], None], servicer: object,
             server: grpc.aio.Server) -> None:
    """add_to_server(servicer, server), with response serializers that pass bytes."""
    add_to_server(servicer, Registrar(server))
