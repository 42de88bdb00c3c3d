"""StoreServicer: validate the request, call storage, build the response.

Each operation is one handler that fills a response message; the
one-operation RPCs and the Pipeline stream both run the same handlers.
Domain errors become gRPC statuses through `STATUS_OF`, the one table of the
mapping; nothing else in the server chooses a status code.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message

from nestkv.server import VERSION
from nestkv.server.errors import (
    InvalidArgument,
    PermissionDenied,
    StoreFault,
    StoreFull,
    StoreUnavailable,
    Unauthenticated,
)
from nestkv.server.limits import Limits, MiB, check_span
from nestkv.server.metrics import OperationMetrics
from nestkv.server.security import Gate, Grant
from nestkv.server.storage import NEVER, NamespacedStorage
from nestkv.v1 import store_pb2 as pb

STATUS_OF: dict[type[StoreFault], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    StoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    StoreFault: grpc.StatusCode.UNKNOWN,
}

RESPONSE_CHUNK_BYTES = 1 * MiB
"""Values a PipelineResponse carries before the rest of its batch goes in the next one."""

Operation = Callable[[Any, Any], None]
"""Runs one request, filling the response message it is given; raises StoreFault."""

_SERVICE = pb.DESCRIPTOR.services_by_name["StoreService"]
SERVICE_NAME: str = _SERVICE.full_name
_PIPELINE = "Pipeline"
_STATS = "Stats"
# Operation's oneof field of each request type: "nestkv.v1.GetRequest" -> "get".
_KIND_OF_REQUEST = {
    field.message_type.full_name: field.name
    for field in pb.Operation.DESCRIPTOR.oneofs_by_name["operation"].fields
    if field.message_type is not None
}
_KINDS = ", ".join(_KIND_OF_REQUEST.values())


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def status_of(fault: StoreFault) -> grpc.StatusCode:
    return next(STATUS_OF[kind] for kind in type(fault).__mro__ if kind in STATUS_OF)


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


def _span(duration: Duration, name: str) -> float:
    """Seconds of a Duration given for expiry or renewal, checked to be valid and positive."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument(f"{name} is not a valid Duration (seconds={seconds}, nanos={nanos})")
    return check_span(seconds + nanos / 1e9, name)


class StoreServicer:
    """The StoreService RPCs over one NamespacedStorage."""

    def __init__(
        self,
        storage: NamespacedStorage,
        limits: Limits,
        *,
        chunk_bytes: int = RESPONSE_CHUNK_BYTES,
        commit: Callable[[], None] | None = None,
        writable: Callable[[], None] | None = None,
        metrics: OperationMetrics | None = None,
        gate: Gate | None = None,
    ) -> None:
        """`commit` runs after each request's writes, before the answer; `writable` before each
        write, raising StoreUnavailable when writes cannot be kept (persistence); `metrics`, if
        given, counts every operation with its status and duration, and every batch's size;
        `gate`, if given, admits each call by its token and scopes its operations (default: open)."""
        self._storage = storage
        self._gate = gate or Gate("", limits)
        self._metrics = metrics
        self._commit = commit or _nothing
        self._writable = writable or _nothing
        self._limits = limits
        self._chunk_bytes = chunk_bytes
        self._started = time.monotonic()
        self._stopping = False
        self._reading: set[asyncio.Task[Any] | None] = set()  # Pipeline streams awaiting a batch
        self._operations: dict[str, Operation] = {
            "set": self.set,
            "get": self.get,
            "delete": self.delete,
            "delete_all": self.delete_all,
            "exists": self.exists,
            "expires_in": self.expires_in,
        }

    def add_to_server(self, server: Any) -> None:
        """Register every RPC of the service on a grpc.aio server."""
        handlers = {}
        for method in _SERVICE.methods:
            parse = _parser(getattr(pb, method.input_type.name))
            serialize = getattr(pb, method.output_type.name).SerializeToString
            if method.name == _PIPELINE:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self.pipeline, request_deserializer=parse, response_serializer=serialize
                )
            elif method.name == _STATS:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unary(
                        "stats", self.stats, pb.StatsResponse, _nothing, self._gate, confine=_confine_stats
                    ),
                    request_deserializer=parse,
                    response_serializer=serialize,
                )
            else:
                kind = _KIND_OF_REQUEST[method.input_type.full_name]
                record = functools.partial(self._metrics.record, kind) if self._metrics else None
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unary(
                        kind,
                        self._operations[kind],
                        getattr(pb, method.output_type.name),
                        self._commit,
                        self._gate,
                        record,
                    ),
                    request_deserializer=parse,
                    response_serializer=serialize,
                )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    def stop_streams(self) -> None:
        """End every Pipeline stream once the batches it has read are answered (for shutdown).

        A batch the server has not read is never run: the client sees its
        stream end unanswered and may send it again elsewhere.
        """
        self._stopping = True
        for stream in list(self._reading):
            if stream is not None:
                stream.cancel()

    async def pipeline(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """The Pipeline RPC: each batch in order, answered in one or more responses.

        The token is checked once, when the stream opens, and again after the auth file is
        reloaded (a revoked token's stream ends); each operation's access is checked on its own.
        """
        stream = asyncio.current_task()
        gate = self._gate
        admitted = gate.version  # the tokens the stream's grant comes from
        grant = await _admit(gate, context)
        batches = aiter(requests)  # only now: a stream refused unread leaves no receiver behind
        while not self._stopping:
            self._reading.add(stream)
            try:
                request = await anext(batches)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if self._stopping:  # cancelled by stop_streams while waiting: end cleanly
                    return
                raise
            finally:
                self._reading.discard(stream)
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            if admitted != gate.version:  # the tokens were reloaded: is this one still held?
                admitted = gate.version
                grant = await _admit(gate, context)
            try:
                responses = self.run_batch(request, grant)
            except StoreFault as fault:  # the commit failed: the client may send the batch again
                await context.abort(status_of(fault), str(fault))
            for response in responses:
                yield response

    def run_batch(self, request: pb.PipelineRequest, grant: Grant | None = None) -> list[pb.PipelineResponse]:
        """Run a batch's operations in order, as `grant` allows (default: anything); one response
        unless the values read need more."""
        grant = grant or self._gate.everything
        scope = grant.scope
        response = pb.PipelineResponse(id=request.id)
        responses = [response]
        results = response.results
        operations = self._operations
        metrics = self._metrics
        clock = time.perf_counter
        started = clock() if metrics else 0.0
        room = self._chunk_bytes
        for operation in request.operations:
            result = results.add()
            kind = operation.WhichOneof("operation")
            if kind is None:
                _fail(result, grpc.StatusCode.INVALID_ARGUMENT, f"operation is empty; set one of {_KINDS}")
                continue
            out = getattr(result, kind)
            out.SetInParent()
            try:
                request_of_kind = getattr(operation, kind)
                scope(kind, request_of_kind)
                operations[kind](request_of_kind, out)
            except StoreFault as fault:
                code = status_of(fault)
                _fail(result, code, fault.confined() if grant.root else str(fault))
                if metrics:
                    now = clock()
                    metrics.record(kind, code.name, now - started)
                    started = now
                continue
            if metrics:
                # From the end of the operation before: its parsing and its result's building count too.
                now = clock()
                metrics.succeeded(kind, now - started)
                started = now
            if kind == "get":
                room -= len(out.value)
                if room < 0 and len(results) > 1:
                    # Too much for one message: this result opens the next response.
                    response = pb.PipelineResponse(id=request.id)
                    responses.append(response)
                    response.results.add().CopyFrom(result)
                    del results[-1]
                    results = response.results
                    room = self._chunk_bytes - len(out.value)
        if metrics:
            metrics.batch_sizes.observe(len(request.operations))
        try:
            self._commit()
        except StoreFault as fault:
            if metrics:  # the stream fails: every operation of the batch failed with it
                self._recount(metrics, request, responses, status_of(fault).name)
            raise
        return responses

    @staticmethod
    def _recount(
        metrics: OperationMetrics,
        request: pb.PipelineRequest,
        responses: list[pb.PipelineResponse],
        code: str,
    ) -> None:
        """Count every operation of a batch whose commit failed with `code` instead of its own status."""
        results = [result for response in responses for result in response.results]
        for operation, result in zip(request.operations, results, strict=True):
            kind = operation.WhichOneof("operation")
            if kind is not None:
                error = result.WhichOneof("result") == "error"
                metrics.recount(kind, _CODE_NAMES[result.error.code] if error else "OK", code)

    def set(self, request: pb.SetRequest, response: pb.SetResponse) -> None:
        limits = self._limits
        limits.check_key(request.key)
        limits.check_value(request.value)
        ttl = _span(request.expires_in, "expires_in") if request.HasField("expires_in") else None
        self._writable()
        self._storage.set(request.path, request.key, request.value, ttl)

    def get(self, request: pb.GetRequest, response: pb.GetResponse) -> None:
        self._limits.check_key(request.key)
        renew_for = _span(request.renew_for, "renew_for") if request.HasField("renew_for") else None
        if renew_for is not None:
            self._writable()
        value = self._storage.get(request.path, request.key, renew_for)
        if value is not None:
            response.found = True
            response.value = value

    def delete(self, request: pb.DeleteRequest, response: pb.DeleteResponse) -> None:
        self._limits.check_key(request.key)
        self._writable()
        self._storage.delete(request.path, request.key)

    def delete_all(self, request: pb.DeleteAllRequest, response: pb.DeleteAllResponse) -> None:
        self._writable()
        self._storage.delete_all(request.path)

    def exists(self, request: pb.ExistsRequest, response: pb.ExistsResponse) -> None:
        self._limits.check_key(request.key)
        response.exists = self._storage.exists(request.path, request.key)

    def stats(self, request: pb.StatsRequest, response: pb.StatsResponse) -> None:
        storage = self._storage
        subtree = storage.subtree(request.path)
        namespace = response.namespace
        namespace.keys, namespace.bytes = subtree.keys, subtree.bytes
        namespace.expiring_keys, namespace.child_namespaces = subtree.expiring_keys, subtree.child_namespaces
        server = response.server
        server.keys, server.memory_bytes, server.max_memory_bytes = (
            storage.keys,
            storage.used_memory,
            storage.max_memory,
        )
        server.evictions, server.expired_keys = storage.evictions, storage.expired
        server.uptime.FromNanoseconds(int((time.monotonic() - self._started) * 1e9))
        server.version = VERSION

    def expires_in(self, request: pb.ExpiresInRequest, response: pb.ExpiresInResponse) -> None:
        self._limits.check_key(request.key)
        left = self._storage.expires_in(request.path, request.key)
        if left is None:
            return
        response.found = True
        if left != NEVER:
            seconds = int(left)
            response.expires_in.seconds = seconds
            response.expires_in.nanos = int((left - seconds) * 1e9)


async def _admit(gate: Gate, context: Any) -> Grant:
    """The grant of a stream's token; a stream without a valid one ends with UNAUTHENTICATED."""
    try:
        return gate.admit(context)
    except Unauthenticated as fault:
        await context.abort(status_of(fault), str(fault))
        raise  # abort raises; this line only tells type checkers so


def _fail(result: pb.OperationResult, code: grpc.StatusCode, message: str) -> None:
    result.error.code = code.value[0]
    result.error.message = message


def _nothing() -> None:
    pass


def _confine_stats(response: pb.StatsResponse) -> None:
    """Stats for a token rooted below the root: the server-wide figures would describe other tenants."""
    server = response.server
    server.keys = server.memory_bytes = server.max_memory_bytes = 0
    server.evictions = server.expired_keys = 0


def _unary(
    kind: str,
    operation: Operation,
    response_class: type[Message],
    commit: Callable[[], None],
    gate: Gate,
    record: Callable[[str, float], None] | None = None,
    confine: Callable[[Any], None] | None = None,
) -> Callable[[Any, Any], Awaitable[Any]]:
    """A grpc.aio method running one operation as the caller's token allows, a StoreFault as its status.

    `record(code, seconds)`, if given, counts the call once its status is known (after the commit);
    `confine(response)`, if given, trims the response of a caller whose token has a root.
    """

    async def method(request: Any, context: Any) -> Any:
        started = time.perf_counter()
        grant = None
        response = response_class()
        try:
            # First: a caller without a token learns nothing, not even that its request would not parse.
            grant = gate.admit(context)
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.reason)
            grant.scope(kind, request)
            operation(request, response)
            if confine and grant.root:
                confine(response)
            commit()
        except StoreFault as fault:
            if record:
                record(status_of(fault).name, time.perf_counter() - started)
            await context.abort(status_of(fault), fault.confined() if grant and grant.root else str(fault))
        if record:
            record("OK", time.perf_counter() - started)
        return response

    return method
