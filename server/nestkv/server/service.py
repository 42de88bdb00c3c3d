"""StoreServicer: the StoreService RPCs. It only serves: parse, admit, hand the batch on, answer.

A one-operation RPC runs as a batch of one, so every operation takes one path:
the batch runner (nestkv.server.batches) with this node's router (a single
server's, or a cluster node's: nestkv.server.cluster.router). A fault becomes
a status through nestkv.server.errors' one table; an error result's number
through nestkv.wire.codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status

from nestkv.server.batches import ANSWER_BYTES, RESPONSE_CHUNK_BYTES, BatchRunner, SliceAnswer, responses_of
from nestkv.server.cluster import Cluster, PeerGrant
from nestkv.server.errors import (
    InvalidArgument,
    NodesOnly,
    StoreFault,
    Unauthenticated,
    Unreachable,
    status_of,
)
from nestkv.server.limits import Limits
from nestkv.server.metrics import OperationMetrics
from nestkv.server.operations import Operations
from nestkv.server.router import Router
from nestkv.server.security import Gate, Grant
from nestkv.server.status import status_of_error, status_of_fault
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.operations import idempotent
from nestkv.wire.placement import HASH_NAME

_SERVICE = pb.DESCRIPTOR.services_by_name["StoreService"]
SERVICE_NAME: str = _SERVICE.full_name
_PEER_SERVICE = peer_pb.DESCRIPTOR.services_by_name["PeerService"]
PEER_SERVICE_NAME: str = _PEER_SERVICE.full_name
_HANDLER_OF = {  # (client streaming, server streaming) -> the grpc handler of such an RPC
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry throttle: a negative value says "do not retry"
_ANSWERS_AHEAD = 32  # slices of a stream run ahead while earlier ones await other nodes
_WAITING_AHEAD = 4
"""Answers as large as one batch's may be (ANSWER_BYTES and one value) that a stream's reader
runs ahead of what the stream has sent: past that, it reads no more batches until some are sent
(a caller that does not read gets nothing more). GrpcStore has 4 batches in flight at most."""
_REFUSAL_QUIET_SECONDS = 0.05  # a refused stream ends once no message came for this long...
_REFUSAL_DRAIN_SECONDS = 1.0  # ...or after this long at most
# Operation's oneof field of each request type: "nestkv.v1.GetRequest" -> "get".
_KIND_OF_REQUEST = {
    field.message_type.full_name: field.name
    for field in pb.Operation.DESCRIPTOR.oneofs_by_name["operation"].fields
    if field.message_type is not None
}


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


def _source(grant: Grant) -> str:
    """Who sent a batch, for its metrics (nestkv.server.metrics.BATCH_SOURCES)."""
    if not isinstance(grant, PeerGrant):
        return "caller"
    return "replicas" if grant.mode == "replica" else "forwarded"


async def _abort(context: Any, status: Any, *, retry: bool = True) -> NoReturn:
    """End the call with google.rpc.Status `status`, its details in the trailer gRPC's richer
    error model puts them in. `retry` False: another node already had its tries, or the
    operation must not run twice: a client's retry policy must not ask again (it would, for
    UNAVAILABLE, and overrun its deadline before hearing why)."""
    ending = rpc_status.to_status(status)
    metadata = (*ending.trailing_metadata, *(() if retry else ((_PUSHBACK, "-1"),)))
    await context.abort(ending.code, ending.details, metadata)
    raise AssertionError("aborted")  # abort raises; this line only tells type checkers so


async def _abort_with(
    context: Any, fault: StoreFault, *, confined: bool = False, retry: bool = True
) -> NoReturn:
    """End the call with `fault` (`confined`: in the words for a caller confined to a namespace)."""
    await _abort(context, status_of_fault(fault, confined=confined), retry=retry)


def _not_a_cluster(context: Any) -> Grant:
    raise NodesOnly("this server is not a member of a cluster: PeerService is for the members of one only")


def _register(
    server: Any, service: Any, served: dict[str, Callable[..., Any]], unary: Callable[[str], Any]
) -> None:
    """Register `service`'s RPCs on a grpc.aio server: `served` by name, the others (one operation
    each) as `unary(kind)` makes them."""
    handlers = {}
    for method in service.methods:
        behaviour = served.get(method.name) or unary(_KIND_OF_REQUEST[method.input_type.full_name])
        handler = _HANDLER_OF[method.client_streaming, method.server_streaming]
        handlers[method.name] = handler(
            behaviour,
            request_deserializer=_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class StoreServicer:
    """The StoreService RPCs of one node."""

    def __init__(
        self,
        operations: Operations,
        router: Router,
        limits: Limits,
        *,
        commit: Callable[[], None] | None = None,
        metrics: OperationMetrics | None = None,
        gate: Gate | None = None,
        cluster: Cluster | None = None,
        chunk_bytes: int = RESPONSE_CHUNK_BYTES,
    ) -> None:
        """`router` places each operation (nestkv.server.router); `commit` runs after each slice's
        writes, before the answer; `metrics`, if given, counts every operation with its status and
        duration, and every Pipeline batch's size; `gate`, if given, admits each call by its token
        and scopes its operations (default: open); `cluster`, if given, admits the calls of its
        members and takes their hand-offs."""
        self._gate = gate or Gate("", limits)
        self._cluster = cluster
        # Admission is per service: StoreService's callers by their token, PeerService's by the
        # member they are (a peer header sent to StoreService counts for nothing there).
        self._admit_caller = self._gate.admit
        self._admit_peer = cluster.admit_peer if cluster else _not_a_cluster
        self._operations = operations
        self._router = router
        self._runner = BatchRunner(
            operations, router, commit=commit, metrics=metrics, chunk_bytes=chunk_bytes
        )
        self._metrics = metrics
        self._limits = limits
        self._stopping = False
        self._ending_callers = False  # stop_streams for the streams of callers only (not peers')
        self._reading: set[asyncio.Task[Any] | None] = set()  # Pipeline streams awaiting a batch
        self._callers_reading: set[asyncio.Task[Any] | None] = set()  # those of callers

    def add_to_server(self, server: Any) -> None:
        """Register every RPC of StoreService (for callers) and of PeerService (for the other
        members of a cluster) on a grpc.aio server."""
        peers_only: dict[str, Callable[..., Any]] = {
            "HandOff": self.hand_off,
            "CatchUp": self.catch_up,
            "Ping": self.ping,
        }
        for service, admit, more in (
            (_SERVICE, self._admit_caller, {}),
            (_PEER_SERVICE, self._admit_peer, peers_only),
        ):
            # Both have these, each with its own admission; every other StoreService RPC is one
            # operation: a batch of one.
            served: dict[str, Callable[..., Any]] = {
                "Pipeline": functools.partial(self.pipeline, admit=admit),
                "Topology": functools.partial(self.topology, admit=admit),
                "Stats": functools.partial(self.stats, admit=admit),
                **more,
            }
            _register(server, service, served, self._unary)

    def stop_streams(self) -> None:
        """End every Pipeline stream once the batches it has read are answered (for shutdown).

        A batch the server has not read is never run: the client sees its
        stream end unanswered and may send it again elsewhere.
        """
        self._stopping = True
        self._end(self._reading)
        self._end(self._callers_reading)

    def end_callers_streams(self) -> None:
        """End every caller's Pipeline stream as `stop_streams` does, and each a caller opens from
        now on, once it is read: callers go to other nodes (a cluster node with replicas stepping
        down before it stops). The streams of peers go on."""
        self._ending_callers = True
        self._end(self._callers_reading)

    def _end(self, streams: set[asyncio.Task[Any] | None]) -> None:
        for stream in list(streams):
            if stream is not None:
                stream.cancel()

    async def pipeline(
        self, requests: AsyncIterator[Any], context: Any, admit: Callable[[Any], Grant]
    ) -> AsyncIterator[Any]:
        """The Pipeline RPC: each batch in order, answered in one or more responses.

        The token is checked once, when the stream opens, and again after the auth file is
        reloaded (a revoked token's stream ends); each operation's access is checked on its own.
        While every slice is answered here, the stream reads, runs and answers in turn. Once one
        waits on other nodes, a task reads on meanwhile (an unreachable node must not hold up
        the keys of the others, nor a slow one every later batch), and answers go out in order.
        """
        batches = self._batches(requests, context, admit)
        ahead: deque[SliceAnswer] = deque()  # answered, in order, before anything read later
        any_order = False  # the caller matches answers by id (PipelineRequest.any_order)

        async def keep(answer: SliceAnswer) -> None:
            ahead.append(answer)

        def answered_here() -> list[pb.PipelineResponse]:
            """The responses of the slices at the head of `ahead` answered here, taken off it."""
            responses = []
            while ahead and isinstance(first := ahead[0], list):
                ahead.popleft()
                responses += first
            return responses

        waiting: set[asyncio.Task[list[pb.PipelineResponse]]] = set()  # answers to come, any order
        try:
            try:
                async for request, grant in batches:
                    any_order = request.any_order
                    await self._runner.run(request, grant, keep)
                    for response in answered_here():
                        yield response
                    if ahead:
                        break  # waits on another node: read on meanwhile
                    await asyncio.sleep(0)  # other callers run between batches read back to back
                else:
                    for response in self._goodbye():
                        yield response
                    return
            except StoreFault as fault:  # the commit failed: the client may send the rest again
                for response in answered_here():  # the slices before it stand
                    yield response
                await _abort_with(context, fault)
            answers: asyncio.Queue[Any] = asyncio.Queue(_ANSWERS_AHEAD)
            held = HeldAnswers(ANSWER_BYTES + self._limits.max_value_bytes, _WAITING_AHEAD)

            async def put(answer: SliceAnswer) -> None:
                held.add(answer)
                await answers.put(answer)

            async def read() -> None:
                try:
                    async for request, grant in batches:
                        await self._runner.run(request, grant, put)
                        await held.room()
                        await asyncio.sleep(0)
                except BaseException as error:
                    await answers.put(error)
                    return
                await answers.put(None)

            reader = asyncio.create_task(read())
            try:
                if not any_order:
                    while ahead:
                        for response in await responses_of(ahead.popleft()):
                            yield response
                    while (answer := await answers.get()) is not None:
                        if isinstance(answer, StoreFault):  # as above
                            await _abort_with(context, answer)
                        if isinstance(answer, BaseException):
                            raise answer
                        for response in await responses_of(answer):
                            yield response
                        held.sent(answer)
                else:
                    # Each answer as soon as it is in: one waiting on a node that does not answer
                    # holds back no other (a batch's slices stay in order: only its last waits).
                    for answer in ahead:
                        if isinstance(answer, list):
                            for response in answer:
                                yield response
                        else:
                            waiting.add(asyncio.ensure_future(answer))
                    ahead.clear()
                    async for answer, responses in _as_answered(answers, waiting, context):
                        for response in responses:
                            yield response
                        held.sent(answer)
                for response in self._goodbye():
                    yield response
            finally:
                reader.cancel()
                while not answers.empty():
                    ahead.append(answers.get_nowait())
        finally:
            for left in (*ahead, *waiting):  # slices run but not answered: the stream is over
                if asyncio.iscoroutine(left) or isinstance(left, asyncio.Task):
                    self._runner.abandon(left)

    def _goodbye(self) -> list[pb.PipelineResponse]:
        """The last message of a Pipeline stream this server ends (it stops, or sends its callers to
        other nodes), once every batch it read is answered: the caller sends the batches it has no
        answer for again, all of them (PipelineResponse.ending). None when the caller ended it."""
        return [pb.PipelineResponse(ending=True)] if self._stopping or self._ending_callers else []

    async def _batches(
        self, requests: AsyncIterator[Any], context: Any, admit: Callable[[Any], Grant]
    ) -> AsyncIterator[tuple[Any, Grant]]:
        """The batches of a stream with the grant each runs under (`admit`: the service's
        admission), until the stream or the server ends."""
        stream = asyncio.current_task()
        metrics = self._metrics
        gate = self._gate
        admitted = gate.version  # the tokens the stream's grant comes from
        grant = await _admit(admit, context, requests)
        batches = aiter(requests)
        reading = self._reading if grant.forwarded else self._callers_reading
        while not (self._stopping or (self._ending_callers and not grant.forwarded)):
            reading.add(stream)
            try:
                request = await anext(batches)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if self._stopping or (self._ending_callers and not grant.forwarded):
                    return  # cancelled by stop_streams (or end_callers_streams) while waiting: end cleanly
                raise
            finally:
                reading.discard(stream)
            try:
                if isinstance(request, _Malformed):
                    raise InvalidArgument(request.reason)
                self._limits.check_batch(len(request.operations))
            except InvalidArgument as fault:
                await _abort_with(context, fault)
            if admitted != gate.version and not grant.forwarded:  # tokens reloaded: still held?
                admitted = gate.version
                grant = await _admit(admit, context, batches)
            if metrics:
                metrics.batch_sizes[_source(grant)].observe(len(request.operations))
            yield request, grant

    async def run_batch(
        self, batch: pb.PipelineRequest, grant: Grant | None = None
    ) -> list[pb.PipelineResponse]:
        """The responses to `batch`, run as `grant` allows (default: anything)."""
        return (await self._runner.run_all(batch, grant or self._gate.everything))[0]

    def _unary(self, kind: str) -> Callable[[Any, Any], Any]:
        """The one-operation RPC of `kind`: a batch of one, its result the answer or the status."""
        metrics = self._metrics

        async def method(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            root: tuple[str, ...] = ()
            try:
                # First: a caller without a token learns nothing, not even that its request would not parse.
                grant = self._admit_caller(context)
                root = grant.root
                if isinstance(request, _Malformed):
                    raise InvalidArgument(request.reason)
            except StoreFault as fault:
                if metrics:
                    metrics.record(kind, status_of(fault), time.perf_counter() - started)
                await _abort_with(context, fault, confined=bool(root))
            batch = pb.PipelineRequest()
            getattr(batch.operations.add(), kind).CopyFrom(request)
            left = context.time_remaining()
            if left is not None:  # the call's own deadline travels with it (to other nodes too)
                batch.deadline_unix_ms = int((time.time() + left) * 1000)
            # An operation that must not run twice (it may have run here) is not to be retried.
            once = not idempotent(batch.operations[0])
            try:
                responses, elsewhere = await self._runner.run_all(batch, grant)
            except StoreFault as fault:  # the commit failed (counted by the runner)
                await _abort_with(context, fault, confined=bool(root), retry=not once)
            [result] = responses[0].results
            if result.WhichOneof("result") != "error":
                return getattr(result, kind)
            return await _abort(context, status_of_error(result.error), retry=not (elsewhere or once))

        return method

    async def stats(self, request: Any, context: Any, admit: Callable[[Any], Grant]) -> pb.StatsResponse:
        """The Stats RPC: this node's figures for the caller's subtree, and in a cluster every node's."""
        root: tuple[str, ...] = ()
        response = pb.StatsResponse()
        try:
            grant = admit(context)
            root = grant.root
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.reason)
            grant.scope("stats", request)
            self._operations.stats(request, response)
            if self._cluster is not None:
                self._cluster.roles(response.server)
            if not grant.forwarded:
                await self._router.stats(request, response)
        except StoreFault as fault:
            await _abort_with(context, fault, confined=bool(root), retry=not isinstance(fault, Unreachable))
        if root:
            _confine_stats(response, root)
        return response

    async def hand_off(self, requests: AsyncIterator[Any], context: Any) -> peer_pb.HandOffResponse:
        """The HandOff RPC: keys another member no longer owns, stored here unless news to nobody."""
        grant = await _admit(self._admit_peer, context, requests)
        cluster = self._cluster
        # What the peers' admission admits:
        assert isinstance(grant, PeerGrant)
        assert cluster is not None
        sender = grant.sender  # the one the member check admitted
        response = peer_pb.HandOffResponse()
        async for request in requests:
            if isinstance(request, _Malformed):
                await _abort_with(context, InvalidArgument(request.reason))
            try:
                stored, skipped = cluster.take(sender, request)
            except StoreFault as fault:  # the sender keeps its keys and tries again
                await _abort_with(context, fault)
            response.stored += stored
            response.skipped += skipped
        response.passed_version = cluster.handoff.passed_version
        return response

    async def _peer(self, context: Any) -> tuple[Cluster, str]:
        """This node's cluster and the member that made the call; anyone else gets UNAUTHENTICATED."""
        try:
            grant = self._admit_peer(context)
        except Unauthenticated as fault:
            await _abort_with(context, fault)
        assert isinstance(grant, PeerGrant)  # what the peers' admission admits
        assert self._cluster is not None
        return self._cluster, grant.sender

    async def ping(self, request: Any, context: Any) -> peer_pb.PingResponse:
        """The Ping RPC: whether this node is current, and takes the calling member to be up."""
        cluster, sender = await self._peer(context)
        return cluster.answer_ping(sender)

    async def catch_up(self, request: Any, context: Any) -> AsyncIterator[peer_pb.HandOffRequest]:
        """The CatchUp RPC: what this node holds of the calling member's keys."""
        cluster, sender = await self._peer(context)
        async for message in cluster.catch_up_for(sender, request.topology_version):
            yield message

    async def topology(
        self, request: Any, context: Any, admit: Callable[[Any], Grant]
    ) -> pb.TopologyResponse:
        """The Topology RPC: the members, the version of their list, the hash, the caller's root."""
        try:
            grant = admit(context)
        except Unauthenticated as fault:
            await _abort_with(context, fault)
        response = pb.TopologyResponse(hash=HASH_NAME, root=grant.root)
        self._router.describe(response)
        return response


async def _as_answered(
    answers: asyncio.Queue[Any],
    waiting: set[asyncio.Task[list[pb.PipelineResponse]]],
    context: Any,
) -> AsyncIterator[tuple[object, list[pb.PipelineResponse]]]:
    """Each slice the stream's reader puts in `answers` (and each of those `waiting`: tasks of
    theirs) with its responses, as soon as they are in, until the reader puts None and every one
    is out: the answer the reader put (or the task, for one waiting before), and its responses."""
    getter: asyncio.Future[Any] | None = None
    reading = True  # the reader has not put None yet
    awaited: dict[asyncio.Future[Any], object] = {}  # the answer each awaits
    try:
        while reading or waiting:
            if reading and getter is None and len(waiting) < _ANSWERS_AHEAD:
                getter = asyncio.ensure_future(answers.get())  # no more waiting than read ahead
            done, _ = await asyncio.wait(
                {*waiting, *([getter] if getter else [])}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is getter:
                    continue
                waiting.discard(task)
                yield awaited.pop(task, task), task.result()
            if getter is None or getter not in done:
                continue
            answer = getter.result()
            getter = None
            reading = answer is not None
            if isinstance(answer, StoreFault):
                await _abort_with(context, answer)
            if isinstance(answer, BaseException):
                raise answer
            if isinstance(answer, list):
                yield answer, answer
            elif answer is not None:
                task = asyncio.ensure_future(answer)
                awaited[task] = answer
                waiting.add(task)
    finally:
        if getter is not None and getter.done() and not getter.cancelled():
            left = getter.result()  # taken off the queue, never answered: abandoned with the rest
            if asyncio.iscoroutine(left):
                waiting.add(asyncio.ensure_future(left))
        elif getter is not None:
            getter.cancel()


class HeldAnswers:
    """The answers a stream's reader has run that the stream has not sent yet, by their bytes:
    the values read, or for one still waiting on other nodes, the most one batch's answer holds."""

    __slots__ = ("_bytes", "_largest", "_limit", "_room", "_weights")

    def __init__(self, largest: int, count: int) -> None:
        """`largest`: the most one answer holds; `count`: how many such answers may be held."""
        self._largest = largest
        self._limit = largest * count
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._weights: dict[int, int] = {}  # by id() of the answer (or of the task that awaits it)

    def add(self, answer: SliceAnswer) -> None:
        weight = self._largest
        if isinstance(answer, list):
            weight = sum(len(result.get.value) for response in answer for result in response.results)
        self._weights[id(answer)] = weight
        self._bytes += weight
        if self._bytes >= self._limit:
            self._room.clear()

    def sent(self, answer: object) -> None:
        """`answer`'s responses were sent."""
        weight = self._weights.pop(id(answer), 0)
        self._bytes -= weight
        if self._bytes < self._limit:
            self._room.set()

    async def room(self) -> None:
        """Return once the answers held are under the limit."""
        await self._room.wait()


async def _refuse_stream(requests: AsyncIterator[Any], context: Any, fault: StoreFault) -> None:
    """End a stream with `fault`'s status once the client stopped sending for a moment.

    Ended while the client's messages are still arriving, a stream's status is lost to some
    clients (grpcio reports INTERNAL "Internal error from Core"); so what the client sent is read
    and dropped first, none of it run, for a bounded time.
    """
    # Bounded by the loop's own reading of the clock, not by cancelling the reads alone: on Python
    # 3.11, asyncio.wait_for swallowed the cancellation of an outer timeout when a message came in
    # at that moment, and a client that kept sending held its stream open until its own deadline.
    loop = asyncio.get_running_loop()
    end = loop.time() + _REFUSAL_DRAIN_SECONDS
    messages = aiter(requests)
    with contextlib.suppress(TimeoutError, StopAsyncIteration):
        while (left := end - loop.time()) > 0:
            async with asyncio.timeout(min(_REFUSAL_QUIET_SECONDS, left)):
                await anext(messages)
    await _abort_with(context, fault)


async def _admit(admit: Callable[[Any], Grant], context: Any, requests: AsyncIterator[Any]) -> Grant:
    """The grant of a stream's token; a stream without a valid one ends with UNAUTHENTICATED."""
    try:
        return admit(context)
    except Unauthenticated as fault:
        await _refuse_stream(requests, context, fault)
        raise  # abort raises; this line only tells type checkers so


def _confine_stats(response: pb.StatsResponse, root: tuple[str, ...]) -> None:
    """Stats for a token rooted below the root: the server-wide figures would describe other tenants,
    and so would a quota above the root; one at or below it is shown by its path from the root."""
    for server in (response.server, *(node.server for node in response.nodes)):
        server.keys = server.memory_bytes = server.max_memory_bytes = 0
        server.evictions = server.expired_keys = 0
        server.keys_first_copy = server.keys_replica = server.keys_held_for_others = 0
        server.replication_failures = 0
    figures: list[pb.StatsResponse | pb.NodeStats] = [response, *response.nodes]
    for stats in figures:
        if not stats.HasField("quota"):
            continue
        if tuple(stats.quota.path[: len(root)]) != root:
            stats.ClearField("quota")
        else:
            del stats.quota.path[: len(root)]
