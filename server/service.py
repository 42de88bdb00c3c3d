"""StoreServicer: validate the request, call storage, build the response.

Domain errors become gRPC statuses through `STATUS_OF`, the one table of the
mapping; nothing else in the server chooses a status code.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message

from nestkv.v1 import store_pb2 as pb
from server.errors import InvalidArgument, StoreFault
from server.limits import Limits, check_span
from server.storage import NEVER, NamespacedStorage

STATUS_OF: dict[type[StoreFault], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    StoreFault: grpc.StatusCode.UNKNOWN,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request], Response]


_SERVICE = pb.DESCRIPTOR.services_by_name["StoreService"]
SERVICE_NAME: str = _SERVICE.full_name


class _Malformed:
    """Stands for a request whose bytes did not parse, so the method can answer INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parser(message_class: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    def parse(data: bytes) -> Message | _Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return _Malformed(f"malformed {message_class.DESCRIPTOR.full_name}: {error}")

    return parse


def _rpc(handler: Handler[Request, Response]) -> Callable[[Any, Request, Any], Awaitable[Response]]:
    """Run a synchronous handler as a grpc.aio method, turning a StoreFault into its status."""

    @functools.wraps(handler)
    async def method(self: Any, request: Request, context: Any) -> Response:
        try:
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.reason)
            return handler(self, request)
        except StoreFault as fault:
            code = next(STATUS_OF[kind] for kind in type(fault).__mro__ if kind in STATUS_OF)
            await context.abort(code, str(fault))
            raise  # unreachable: abort raises

    return method


def _span(duration: Duration, name: str) -> float:
    """Seconds of a Duration given for expiry or renewal, checked to be valid and positive."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument(f"{name} is not a valid Duration (seconds={seconds}, nanos={nanos})")
    return check_span(seconds + nanos / 1e9, name)


class StoreServicer:
    """The StoreService RPCs over one NamespacedStorage."""

    def __init__(self, storage: NamespacedStorage, limits: Limits) -> None:
        self._storage = storage
        self._limits = limits

    def add_to_server(self, server: Any) -> None:
        """Register every RPC of the service on a grpc.aio server."""
        handlers = {}
        for method in _SERVICE.methods:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(self, method.name),
                request_deserializer=_parser(getattr(pb, method.input_type.name)),
                response_serializer=getattr(pb, method.output_type.name).SerializeToString,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    @_rpc
    def Set(self, request: pb.SetRequest) -> pb.SetResponse:
        limits = self._limits
        limits.check_path(request.path)
        limits.check_key(request.key)
        limits.check_value(request.value)
        ttl = _span(request.expires_in, "expires_in") if request.HasField("expires_in") else None
        self._storage.set(request.path, request.key, request.value, ttl)
        return pb.SetResponse()

    @_rpc
    def Get(self, request: pb.GetRequest) -> pb.GetResponse:
        self._limits.check_path(request.path)
        self._limits.check_key(request.key)
        renew_for = _span(request.renew_for, "renew_for") if request.HasField("renew_for") else None
        value = self._storage.get(request.path, request.key, renew_for)
        if value is None:
            return pb.GetResponse(found=False)
        return pb.GetResponse(found=True, value=value)

    @_rpc
    def Delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        self._limits.check_path(request.path)
        self._limits.check_key(request.key)
        self._storage.delete(request.path, request.key)
        return pb.DeleteResponse()

    @_rpc
    def DeleteAll(self, request: pb.DeleteAllRequest) -> pb.DeleteAllResponse:
        self._limits.check_path(request.path)
        self._storage.delete_all(request.path)
        return pb.DeleteAllResponse()

    @_rpc
    def Exists(self, request: pb.ExistsRequest) -> pb.ExistsResponse:
        self._limits.check_path(request.path)
        self._limits.check_key(request.key)
        return pb.ExistsResponse(exists=self._storage.exists(request.path, request.key))

    @_rpc
    def ExpiresIn(self, request: pb.ExpiresInRequest) -> pb.ExpiresInResponse:
        self._limits.check_path(request.path)
        self._limits.check_key(request.key)
        left = self._storage.expires_in(request.path, request.key)
        if left is None:
            return pb.ExpiresInResponse(found=False)
        if left == NEVER:
            return pb.ExpiresInResponse(found=True)
        seconds = int(left)
        return pb.ExpiresInResponse(
            found=True, expires_in=Duration(seconds=seconds, nanos=int((left - seconds) * 1e9))
        )
