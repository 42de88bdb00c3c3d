"""StoreServicer: validate the request, call storage, build the response.

Each operation is one handler that fills a response message; the
one-operation RPCs and the Pipeline stream both run the same handlers.
Domain errors become gRPC statuses through `STATUS_OF`, the one table of the
mapping; nothing else in the server chooses a status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message

from nestkv.client.placement import HASH_NAME
from nestkv.server import VERSION
from nestkv.server.cluster import Cluster, HandOff, PeerGrant, missed
from nestkv.server.errors import (
    InvalidArgument,
    NodeFault,
    PermissionDenied,
    QuotaExceeded,
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
    QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
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
_TOPOLOGY = "Topology"
_HAND_OFF = "HandOff"
_READ_KINDS = frozenset({"get", "exists", "expires_in"})
_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry throttle: a negative value says "do not retry"
_ANSWERS_AHEAD = 32  # batches of a routed stream read ahead while earlier ones await other nodes
# Operations run between two yields to the event loop: a large batch runs in slices, so that no
# other caller waits behind it for more than one slice (a few milliseconds). In a cluster, a
# slice's forwarded operations are answered before the next slice runs: what one batch has sent
# to other nodes and not had answered is at most a slice.
SLICE_OPERATIONS = 256
_REFUSAL_QUIET_SECONDS = 0.05  # a refused stream ends once no message came for this long...
_REFUSAL_DRAIN_SECONDS = 1.0  # ...or after this long at most
# Operation's oneof field of each request type: "nestkv.v1.GetRequest" -> "get".
_KIND_OF_REQUEST = {
    field.message_type.full_name: field.name
    for field in pb.Operation.DESCRIPTOR.oneofs_by_name["operation"].fields
    if field.message_type is not None
}
_KINDS = ", ".join(_KIND_OF_REQUEST.values())


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def status_of(fault: StoreFault) -> grpc.StatusCode:
    if isinstance(fault, NodeFault):
        return grpc.StatusCode[fault.code]
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
        cluster: Cluster | None = None,
    ) -> None:
        """`commit` runs after each request's writes, before the answer; `writable` before each
        write, raising StoreUnavailable when writes cannot be kept (persistence); `metrics`, if
        given, counts every operation with its status and duration, and every batch's size;
        `gate`, if given, admits each call by its token and scopes its operations (default: open);
        `cluster`, if given, sends each operation to the node that owns its key."""
        self._storage = storage
        self._gate = gate or Gate("", limits)
        self._cluster = cluster
        self._admit = cluster.admit if cluster else self._gate.admit
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
            elif method.name == _HAND_OFF:
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    self.hand_off, request_deserializer=parse, response_serializer=serialize
                )
            elif method.name == _TOPOLOGY:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self.topology, request_deserializer=parse, response_serializer=serialize
                )
            elif method.name == _STATS:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unary(
                        "stats",
                        self.stats,
                        pb.StatsResponse,
                        _nothing,
                        self._admit,
                        confine=_confine_stats,
                        remote=self._cluster_stats if self._cluster else None,
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
                        self._admit,
                        record,
                        remote=functools.partial(self._route_unary, kind) if self._cluster else None,
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
        batches = self._batches(requests, context)
        if self._cluster is None:
            async for request, grant in batches:
                for start in _slice_starts(request):
                    if start:
                        await asyncio.sleep(0)  # a slice done: let other callers run
                    try:
                        responses = self.run_batch(request, grant, start=start, stop=start + SLICE_OPERATIONS)
                    except StoreFault as fault:  # the commit failed: the client may send the rest again
                        await context.abort(status_of(fault), str(fault))
                    for response in responses:
                        yield response
                await asyncio.sleep(0)  # and between batches read back to back
            return
        # Routed: batches whose operations went to other nodes are answered once those have; the
        # stream reads on meanwhile (an unreachable node must not hold up the keys of the others),
        # and answers in order.
        answers: asyncio.Queue[Any] = asyncio.Queue(_ANSWERS_AHEAD)

        async def read() -> None:
            try:
                async for request, grant in batches:
                    await answers.put(await self._run_routed(request, grant))
                    await asyncio.sleep(0)  # other callers run between batches read back to back
            except BaseException as error:
                await answers.put(error)
                return
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                if isinstance(answer, StoreFault):
                    await context.abort(status_of(answer), str(answer))
                if isinstance(answer, BaseException):
                    raise answer
                for response in await answer:
                    yield response
        finally:
            reader.cancel()
            while not answers.empty():  # batches read but not answered: the stream is over
                left = answers.get_nowait()
                if asyncio.iscoroutine(left):
                    left.close()

    async def _batches(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[tuple[Any, Grant]]:
        """The batches of a stream with the grant each runs under, until the stream or the server ends."""
        stream = asyncio.current_task()
        gate = self._gate
        admitted = gate.version  # the tokens the stream's grant comes from
        grant = await _admit(self._admit, context, requests)
        batches = aiter(requests)
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
            try:
                self._limits.check_batch(len(request.operations))
            except InvalidArgument as fault:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(fault))
            if admitted != gate.version and not grant.forwarded:  # tokens reloaded: still held?
                admitted = gate.version
                grant = await _admit(self._admit, context, batches)
            yield request, grant

    async def _run_routed(
        self, request: pb.PipelineRequest, grant: Grant
    ) -> Awaitable[list[pb.PipelineResponse]]:
        """Run a batch here and on the nodes that own its keys, a slice at a time; its responses,
        once all have answered.

        A commit failure is raised as StoreFault here (the stream ends), as in run_batch.
        """
        if request.topology_version and self._cluster is not None:
            self._cluster.heard_of(
                request.topology_version, grant.sender if isinstance(grant, PeerGrant) else ""
            )
        responses: list[pb.PipelineResponse] = []
        pending: list[tuple[pb.OperationResult, Awaitable[pb.OperationResult | None]]] = []
        for start in _slice_starts(request):
            if start:
                await _answered(pending)  # the other nodes answer a slice before the next is sent
                pending = []
                await asyncio.sleep(0)  # and other callers run between slices
            responses += self.run_batch(request, grant, pending, start, start + SLICE_OPERATIONS)
        stale = self._cluster is not None and request.topology_version not in (
            "",
            self._cluster.topology.version,
        )
        if stale:
            assert self._cluster is not None
            responses[0].topology_version = self._cluster.topology.version
        if not pending and len(responses) == 1:
            done: asyncio.Future[list[pb.PipelineResponse]] = asyncio.get_running_loop().create_future()
            done.set_result(responses)
            return done
        return self._gather(request, responses, pending)

    async def _gather(
        self,
        request: pb.PipelineRequest,
        responses: list[pb.PipelineResponse],
        pending: list[tuple[pb.OperationResult, Awaitable[pb.OperationResult | None]]],
    ) -> list[pb.PipelineResponse]:
        await _answered(pending)
        return _rechunk(request.id, responses, self._chunk_bytes)

    def run_batch(
        self,
        request: pb.PipelineRequest,
        grant: Grant | None = None,
        pending: list[tuple[pb.OperationResult, Awaitable[pb.OperationResult | None]]] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> list[pb.PipelineResponse]:
        """Run a batch's operations in order (those from `start` to `stop`: a slice), as `grant`
        allows (default: anything); one response unless the values read need more.

        In a cluster, an operation another node owns is sent there, and `pending` gets its
        result with the answer to put in it (None: keep the result as it is).
        """
        grant = grant or self._gate.everything
        scope = grant.scope
        cluster = None if grant.forwarded or pending is None else self._cluster
        handoff = self._cluster.handoff if self._cluster is not None else None
        # A peer's operations on keys our list gives to another node go back to it, to send there;
        # even redirected ones, once this node is off its own list (it is handing everything off).
        moving = None
        if (
            isinstance(grant, PeerGrant)
            and self._cluster is not None
            and (not grant.mode or (grant.mode == "redirected" and self._cluster.removed))
        ):
            moving = self._cluster
        # Once a batch, not per operation: `active` reads the clock.
        during_hand_off = handoff is not None and pending is not None and (grant.forwarded or handoff.active)
        # A batch the client routed by the current topology: its delete_all is for this node only.
        fan_out = cluster is not None and request.topology_version != cluster.topology.version
        response = pb.PipelineResponse(id=request.id)
        responses = [response]
        results = response.results
        operations = self._operations
        metrics = self._metrics
        clock = time.perf_counter
        started = clock() if metrics else 0.0
        room = self._chunk_bytes
        whole = start == 0 and (stop is None or stop >= len(request.operations))
        for operation in request.operations if whole else request.operations[start:stop]:
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
                if cluster is not None:
                    assert pending is not None
                    if kind == "delete_all":
                        if fan_out:  # here below, and on every other node
                            pending.append((result, cluster.fan_out(operation, metrics)))
                    else:
                        owner = cluster.owner(request_of_kind.path, request_of_kind.key)
                        if owner is not None:
                            pending.append((result, cluster.forward(owner, operation)))
                            if metrics:
                                metrics.forwarded[owner] = metrics.forwarded.get(owner, 0) + 1
                                started = clock()
                            continue
                elif moving is not None and kind != "delete_all":
                    # Even back to the sender: its list gives the key to this node, ours to it, and
                    # a key handed off there is found only there.
                    owner = moving.owner(request_of_kind.path, request_of_kind.key)
                    if owner is not None:
                        moving.moved(result, owner, moving.topology.members[owner])
                        continue
                operations[kind](request_of_kind, out)
                if during_hand_off:
                    assert handoff is not None
                    assert pending is not None
                    asked = self._during_hand_off(
                        handoff, kind, request_of_kind, out, grant, request.topology_version
                    )
                    if asked is not None:
                        pending.append((result, self._ask_previous_owner(handoff, asked, operation)))
            except StoreFault as fault:
                code = status_of(fault)
                # A peer passes the message to its caller, who may be confined to a namespace.
                _fail(result, code, fault.confined() if grant.root or grant.forwarded else str(fault))
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
        if metrics and start == 0:
            metrics.batch_sizes.observe(len(request.operations))
        try:
            self._commit()
        except StoreFault as fault:
            if metrics:  # the stream fails: every operation of the slice failed with it
                self._recount(metrics, request.operations[start:stop], responses, status_of(fault).name)
            raise
        return responses

    @staticmethod
    def _recount(
        metrics: OperationMetrics,
        operations: Sequence[pb.Operation],
        responses: list[pb.PipelineResponse],
        code: str,
    ) -> None:
        """Count every operation of a slice whose commit failed with `code` instead of its own status."""
        results = [result for response in responses for result in response.results]
        for operation, result in zip(operations, results, strict=True):
            kind = operation.WhichOneof("operation")
            if kind is not None:
                error = result.WhichOneof("result") == "error"
                metrics.recount(kind, _CODE_NAMES[result.error.code] if error else "OK", code)

    def _during_hand_off(
        self, handoff: HandOff, kind: str, request: Any, response: Any, grant: Grant, version: str = ""
    ) -> str | None:
        """Keep hand-offs right around an operation run here: the member to ask about a read that
        missed (None: the miss stands); deletes remembered, so no older copy brings a key back."""
        if kind in _READ_KINDS:
            if _found(kind, response) or (isinstance(grant, PeerGrant) and grant.mode):
                return None  # redirected (the sender asks next) or asked: answered from what is here
            return handoff.previous_owner(request.path, request.key)
        if kind == "delete":
            handoff.deleted(request.path, request.key)
        elif kind == "delete_all":
            handoff.cleared(request.path)
        else:
            handoff.written(request.path, request.key)
            if (
                grant.forwarded
                and self._cluster is not None
                and self._cluster.owner(request.path, request.key)
            ):
                handoff.write_elsewhere(version)  # a peer placed it by another member list
        return None

    async def _ask_previous_owner(
        self, handoff: HandOff, member: str, operation: pb.Operation
    ) -> pb.OperationResult | None:
        """The answer of a key's previous owner to a read that missed here; None: the miss stands."""
        assert self._cluster is not None
        assert handoff.previous is not None
        address = handoff.previous.members[member]
        result = await self._cluster.forward(member, operation, address, "asked")
        if result.WhichOneof("result") == "error" and handoff.unanswered(member):
            return None
        if missed(operation, result):
            # It may have come here meanwhile: a hand-off stores a key here before the previous
            # owner drops it, so a miss there that came after the drop finds it here now.
            return self._run_here(operation)
        return result

    def _run_here(self, operation: pb.Operation) -> pb.OperationResult:
        """The result of running `operation` on this node's store, now."""
        result = pb.OperationResult()
        kind = operation.WhichOneof("operation")
        out = getattr(result, kind)
        out.SetInParent()
        try:
            self._operations[kind](getattr(operation, kind), out)
        except StoreFault as fault:
            _fail(result, status_of(fault), fault.confined())
        return result

    async def hand_off(self, requests: AsyncIterator[Any], context: Any) -> pb.HandOffResponse:
        """The HandOff RPC: keys another member no longer owns, stored here unless news to nobody."""
        grant = await _admit(self._admit, context, requests)
        handoff = self._cluster.handoff if self._cluster is not None else None
        if not isinstance(grant, PeerGrant) or handoff is None:
            await _refuse_stream(
                requests, context, Unauthenticated("HandOff is for the members of a cluster only")
            )
        assert isinstance(grant, PeerGrant)
        assert handoff is not None
        sender = grant.sender  # the one the member check admitted
        response = pb.HandOffResponse()
        async for request in requests:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            if self._cluster is not None:
                self._cluster.heard_of(request.topology_version, sender)
            try:
                self._writable()
                stored, skipped = handoff.take(sender, request)
                self._commit()
            except StoreFault as fault:  # the sender keeps its keys and tries again
                await context.abort(status_of(fault), str(fault))
            response.stored += stored
            response.skipped += skipped
        response.passed_version = handoff.passed_version
        return response

    async def topology(self, request: Any, context: Any) -> pb.TopologyResponse:
        """The Topology RPC: the members, the version of their list, the hash, the caller's root."""
        try:
            grant = self._admit(context)
        except Unauthenticated as fault:
            await context.abort(status_of(fault), str(fault))
        response = pb.TopologyResponse(hash=HASH_NAME, root=grant.root)
        if self._cluster is None:  # a single server: no members, everything goes to it
            return response
        topology = self._cluster.topology
        for member, address in topology.members.items():
            response.members.add(id=member, address=address)
        response.version = topology.version
        response.node_id = self._cluster.node_id
        handoff = self._cluster.handoff
        if handoff is not None and handoff.previous is not None:
            response.previous_version = handoff.previous.version
        return response

    async def _route_unary(
        self, kind: str, request: Any, response: Any, run_here: Callable[[], None]
    ) -> None:
        """One-operation RPC in a cluster: on the key's owner, or (delete_all) on every node."""
        assert self._cluster is not None
        cluster = self._cluster
        operation = pb.Operation()
        getattr(operation, kind).CopyFrom(request)
        metrics = self._metrics
        handoff = cluster.handoff
        if kind == "delete_all":
            run_here()
            if handoff is not None:
                handoff.cleared(request.path)
            failed = await cluster.fan_out(operation, metrics)
        else:
            owner = cluster.owner(request.path, request.key)
            if owner is not None:
                if metrics:
                    metrics.forwarded[owner] = metrics.forwarded.get(owner, 0) + 1
                failed = await cluster.forward(owner, operation)
            else:
                run_here()
                if handoff is None or not handoff.active:
                    return
                asked = self._during_hand_off(handoff, kind, request, response, self._gate.everything)
                if asked is None:
                    return
                answer = await self._ask_previous_owner(handoff, asked, operation)
                if answer is None:
                    return
                failed = answer
            if failed.WhichOneof("result") != "error":
                response.CopyFrom(getattr(failed, kind))
                return
        if failed is not None:
            raise NodeFault(_CODE_NAMES.get(failed.error.code, "UNKNOWN"), failed.error.message)

    async def _cluster_stats(self, request: Any, response: Any, run_here: Callable[[], None]) -> None:
        """Stats in a cluster: this node's figures and every other's, each and summed."""
        assert self._cluster is not None
        run_here()
        own = pb.NodeStats(
            node_id=self._cluster.node_id, namespace=response.namespace, server=response.server
        )
        if response.HasField("quota"):
            own.quota.CopyFrom(response.quota)
        answers = await self._cluster.stats(request)
        missing = [answer for answer in answers.values() if isinstance(answer, str)]
        if missing:
            raise NodeFault(
                "UNAVAILABLE",
                f"stats did not reach {len(missing)} of {len(answers) + 1} nodes: " + "; ".join(missing),
            )
        response.nodes.append(own)
        for member, answer in sorted(answers.items()):
            assert isinstance(answer, pb.StatsResponse)
            node = response.nodes.add(node_id=member, namespace=answer.namespace, server=answer.server)
            if answer.HasField("quota"):
                node.quota.CopyFrom(answer.quota)
                if not response.HasField("quota"):
                    response.quota.CopyFrom(answer.quota)
                response.quota.used_bytes = max(response.quota.used_bytes, answer.quota.used_bytes)
        total_namespace, total_server = response.namespace, response.server
        for node in response.nodes[1:]:
            for name in ("keys", "bytes", "expiring_keys"):
                setattr(total_namespace, name, getattr(total_namespace, name) + getattr(node.namespace, name))
            total_namespace.child_namespaces = max(
                total_namespace.child_namespaces, node.namespace.child_namespaces
            )
            for name in ("keys", "memory_bytes", "max_memory_bytes", "evictions", "expired_keys"):
                setattr(total_server, name, getattr(total_server, name) + getattr(node.server, name))

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
        quota = storage.quota_at(request.path)
        if quota is not None:
            quota_path, response.quota.max_bytes, response.quota.used_bytes = quota
            response.quota.path.extend(quota_path)
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


def _slice_starts(request: pb.PipelineRequest) -> range:
    """Where each slice of a batch starts (one slice for an empty batch, which is answered too)."""
    return range(0, max(len(request.operations), 1), SLICE_OPERATIONS)


async def _answered(pending: list[tuple[pb.OperationResult, Awaitable[pb.OperationResult | None]]]) -> None:
    """Wait for the answers of other nodes and put each in its result (an error result stays)."""
    answers = await asyncio.gather(*(answer for _, answer in pending))
    for (result, _), answer in zip(pending, answers, strict=True):
        if answer is not None and result.WhichOneof("result") != "error":
            result.CopyFrom(answer)


async def _refuse_stream(requests: AsyncIterator[Any], context: Any, fault: StoreFault) -> None:
    """End a stream with `fault`'s status once the client stopped sending for a moment.

    Ended while the client's messages are still arriving, a stream's status is lost to some
    clients (grpcio reports INTERNAL "Internal error from Core"); so what the client sent is read
    and dropped first, none of it run, for a bounded time.
    """
    with contextlib.suppress(TimeoutError, StopAsyncIteration):
        async with asyncio.timeout(_REFUSAL_DRAIN_SECONDS):
            messages = aiter(requests)
            while True:
                await asyncio.wait_for(anext(messages), _REFUSAL_QUIET_SECONDS)
    await context.abort(status_of(fault), str(fault))


async def _admit(admit: Callable[[Any], Grant], context: Any, requests: AsyncIterator[Any]) -> Grant:
    """The grant of a stream's token; a stream without a valid one ends with UNAUTHENTICATED."""
    try:
        return admit(context)
    except Unauthenticated as fault:
        await _refuse_stream(requests, context, fault)
        raise  # abort raises; this line only tells type checkers so


def _rechunk(
    batch_id: int, responses: list[pb.PipelineResponse], chunk_bytes: int
) -> list[pb.PipelineResponse]:
    """`responses` cut again so that values of about `chunk_bytes` go in each (forwarded reads
    arrive after the batch was first cut)."""
    results = [result for response in responses for result in response.results]
    if len(responses) == 1 and sum(len(result.get.value) for result in results) <= chunk_bytes:
        return responses
    cut = [pb.PipelineResponse(id=batch_id, topology_version=responses[0].topology_version)]
    room = chunk_bytes
    for result in results:
        size = len(result.get.value)
        if size > room and cut[-1].results:
            cut.append(pb.PipelineResponse(id=batch_id))
            room = chunk_bytes
        room -= size
        cut[-1].results.add().CopyFrom(result)
    return cut


def _found(kind: str, response: Any) -> bool:
    """Whether a read's response found its key."""
    return bool(response.exists) if kind == "exists" else bool(response.found)


def _fail(result: pb.OperationResult, code: grpc.StatusCode, message: str) -> None:
    result.error.code = code.value[0]
    result.error.message = message


def _nothing() -> None:
    pass


def _confine_stats(response: pb.StatsResponse, root: tuple[str, ...]) -> None:
    """Stats for a token rooted below the root: the server-wide figures would describe other tenants,
    and so would a quota above the root; one at or below it is shown by its path from the root."""
    for server in (response.server, *(node.server for node in response.nodes)):
        server.keys = server.memory_bytes = server.max_memory_bytes = 0
        server.evictions = server.expired_keys = 0
    figures: list[pb.StatsResponse | pb.NodeStats] = [response, *response.nodes]
    for stats in figures:
        if not stats.HasField("quota"):
            continue
        if tuple(stats.quota.path[: len(root)]) != root:
            stats.ClearField("quota")
        else:
            del stats.quota.path[: len(root)]


def _unary(
    kind: str,
    operation: Operation,
    response_class: type[Message],
    commit: Callable[[], None],
    admit: Callable[[Any], Grant],
    record: Callable[[str, float], None] | None = None,
    confine: Callable[[Any, tuple[str, ...]], None] | None = None,
    remote: Callable[[Any, Any, Callable[[], None]], Awaitable[None]] | None = None,
) -> Callable[[Any, Any], Awaitable[Any]]:
    """A grpc.aio method running one operation as the caller's token allows, a StoreFault as its status.

    `record(code, seconds)`, if given, counts the call once its status is known (after the commit);
    `confine(response, root)`, if given, trims the response of a caller whose token has a root;
    `remote(request, response, run_here)`, if given (a cluster), runs the operation where its key
    lives, calling `run_here()` for this node's part; calls other nodes forwarded are run here.
    """

    async def method(request: Any, context: Any) -> Any:
        started = time.perf_counter()
        grant = None
        response = response_class()
        try:
            # First: a caller without a token learns nothing, not even that its request would not parse.
            grant = admit(context)
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.reason)
            grant.scope(kind, request)
            if remote is None or grant.forwarded:
                operation(request, response)
            else:
                await remote(request, response, functools.partial(operation, request, response))
            if confine and grant.root:
                confine(response, grant.root)
            commit()
        except StoreFault as fault:
            if record:
                record(status_of(fault).name, time.perf_counter() - started)
            if isinstance(fault, NodeFault):
                # Another node already had its tries: a client's retry policy must not ask again
                # (it would, for UNAVAILABLE, and overrun its deadline before hearing why).
                context.set_trailing_metadata(((_PUSHBACK, "-1"),))
            await context.abort(status_of(fault), fault.confined() if grant and grant.root else str(fault))
        if record:
            record("OK", time.perf_counter() - started)
        return response

    return method
