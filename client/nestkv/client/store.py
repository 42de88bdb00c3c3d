"""GrpcStore: the Store API over gRPC, one namespace path per store object."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Self

import grpc

from nestkv.client._arguments import (
    as_bytes,
    check_amount,
    check_key,
    check_segment,
    check_version,
    set_condition,
    span_seconds,
    whole_seconds,
)
from nestkv.client.base import NamespacedStore, Versioned
from nestkv.client.routing import Router
from nestkv.client.stats import Stats, stats_from_response
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from nestkv.wire.channel import (
    DEFAULT_MAX_VALUE_BYTES,
    channel_options,
    plaintext_token_refused,
    seed_targets,
)
from nestkv.wire.errors import InvalidRequestError, StoreError, StoreUnavailableError, error_from_rpc
from nestkv.wire.pipeline import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCHES_IN_FLIGHT,
    MAX_BATCH_SIZE,
    Pipeline,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0

_SET_CONDITION = {
    "always": pb.SET_CONDITION_ALWAYS,
    "absent": pb.SET_CONDITION_IF_ABSENT,
    "present": pb.SET_CONDITION_IF_PRESENT,
    "version": pb.SET_CONDITION_IF_VERSION,
}
"""A conditional set's condition, by the name the store's methods pass, as the .proto's enum."""


class _Seeds:
    """The channels to the addresses a store was given: its calls go to the first of them that is
    connected (the one in use, while it is), so that a store given several starts, and goes on,
    while some are down. As a stub: the StoreService RPCs of the one in use."""

    __slots__ = ("_channels", "_current", "_stubs")

    def __init__(self, channels: Sequence[Any]) -> None:
        self._channels = list(channels)
        self._stubs = [store_pb2_grpc.StoreServiceStub(channel) for channel in self._channels]
        self._current = 0

    def __getattr__(self, rpc: str) -> Any:
        return getattr(self._stubs[self._current], rpc)

    def open_stream(self) -> Any:
        """A Pipeline call on the channel in use."""
        return self._stubs[self._current].Pipeline()

    async def ready(self) -> None:
        """Return once a channel is connected: the one in use if it is, else the first to connect."""
        channels = self._channels
        if len(channels) == 1 or channels[self._current].get_state() == grpc.ChannelConnectivity.READY:
            await channels[self._current].channel_ready()
            return
        waits = [asyncio.ensure_future(channel.channel_ready()) for channel in channels]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        connected = [index for index, wait in enumerate(waits) if wait.done() and not wait.cancelled()]
        self._current = connected[0]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class _Connection:
    """The channel and Pipeline stream shared by a root store and every store derived from it.

    A grpc.aio channel belongs to the event loop it was made in, so an owned
    connection opens one channel per loop, lazily, on first use in that loop:
    a store built at import time works, and so does one used both by a test
    and by an app running in a test client's own loop. Each loop also gets
    its own Pipeline, which coalesces the operations issued in that loop.
    """

    __slots__ = (
        "_by_loop",
        "_callers_channel",
        "_credentials",
        "_options",
        "_pipeline_settings",
        "_target",
        "max_value_bytes",
        "timeout",
    )

    def __init__(
        self,
        *,
        channel: Any = None,
        target: Sequence[str] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        max_value_bytes: int,
        timeout: float | None,
        max_batch_size: int,
        max_batches_in_flight: int,
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._options = list(options)
        self.max_value_bytes = max_value_bytes
        self.timeout = timeout
        self._callers_channel = channel
        self._pipeline_settings: dict[str, Any] = {
            "timeout": timeout,
            "max_batch_size": max_batch_size,
            "max_batches_in_flight": max_batches_in_flight,
        }
        # Per loop: the channel, its StoreService stub, its Pipeline and (an owned channel) a Router.
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[Any, Any, Pipeline, Router | None]] = {}

    def pipeline(self, path: Sequence[str], key: str) -> Pipeline:
        """The Pipeline to send an operation on `key` in `path` with, in the running loop."""
        opened = self._opened()
        router = opened[3]
        return opened[2] if router is None else router.pipeline_for(path, key)

    def every_node(self) -> tuple[Pipeline, dict[str, Pipeline] | None]:
        """The seed's Pipeline, and every member's when the store routes and knows the cluster."""
        opened = self._opened()
        router = opened[3]
        return opened[2], None if router is None else router.every_node()

    def stub(self) -> Any:
        """The StoreService stub of the running loop's channel, for the RPCs outside the Pipeline."""
        return self._opened()[1]

    def _opened(self) -> tuple[Any, Any, Pipeline, Router | None]:
        loop = asyncio.get_running_loop()
        opened = self._by_loop.get(loop)
        if opened is None:
            # Forget channels of loops that are gone: they cannot be used or closed any more.
            self._by_loop = {old: pair for old, pair in self._by_loop.items() if not old.is_closed()}
            channel = self._callers_channel
            router = None
            if channel is None:  # channels of our own: route to the owners
                channel = stub = seeds = _Seeds([self._channel(target) for target in self._target])
                seed = functools.partial(self._seed_pipeline, seeds)
                router = Router(seeds, seed, self._member_pipeline, self.timeout)
                pipeline = router.seed
            else:
                stub = store_pb2_grpc.StoreServiceStub(channel)
                pipeline = Pipeline(stub.Pipeline, ready=channel.channel_ready, **self._pipeline_settings)
            opened = self._by_loop[loop] = (channel, stub, pipeline, router)
        return opened

    def _channel(self, target: str) -> Any:
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=self._options)
        return grpc.aio.secure_channel(target, self._credentials, options=self._options)

    def _seed_pipeline(self, seeds: _Seeds, on_news: Callable[[pb.PipelineResponse], None]) -> Pipeline:
        return Pipeline(seeds.open_stream, on_news=on_news, ready=seeds.ready, **self._pipeline_settings)

    def _member_pipeline(
        self,
        address: str,
        on_news: Callable[[pb.PipelineResponse], None],
        topology_version: Callable[[], str],
    ) -> tuple[Pipeline, Callable[[], Awaitable[None]], Callable[..., Any]]:
        """A member's Pipeline, how to close it, and its Topology RPC."""
        channel = self._channel(address)
        # One batch in flight per node: what is issued meanwhile goes in the next. Answers from
        # several nodes come at different times and wake callers in small groups; with more in
        # flight, batches shrank to ~5 operations over 3 nodes (bench/cluster.py), each costing
        # a message on both sides. A lone operation still goes at once.
        settings = {**self._pipeline_settings, "max_batches_in_flight": 1}
        stub = store_pb2_grpc.StoreServiceStub(channel)
        pipeline = Pipeline(
            stub.Pipeline,
            topology_version=topology_version,
            on_news=on_news,
            ready=channel.channel_ready,
            **settings,
        )

        async def close() -> None:
            await pipeline.close()
            await channel.close()

        return pipeline, close, stub.Topology

    async def close(self) -> None:
        """Stop the running loop's stream and close its channel, unless the caller owns the channel."""
        opened = self._by_loop.pop(asyncio.get_running_loop(), None)
        if opened is not None:
            channel, _, pipeline, router = opened
            if router is not None:
                await router.close()
            await pipeline.close()
            if channel is not self._callers_channel:
                await channel.close()


class GrpcStore(NamespacedStore):
    """A NamespacedStore served by a nestkv server over gRPC.

    Build one with `GrpcStore.with_client(target)`, which owns its channel
    (opened lazily, in the event loop that first uses the store) and closes it
    on `close()` / `async with` exit; or with `GrpcStore(channel)`, which uses
    a grpc.aio channel you own and never closes it. Stores made by
    `with_namespace` share their parent's channel and never close it.

    Operations travel on one Pipeline stream per channel and event loop:
    those that concurrent tasks issue in the same turn of the loop go in one
    batch, with no added delay for a lone operation (see nestkv.wire.pipeline).
    At most `max_batch_size` operations go in a batch and at most
    `max_batches_in_flight` batches await results; beyond that, callers wait.
    `get_many`, `set_many` and `delete_many` send many keys at once.

    Every operation has a deadline of `timeout` seconds (None: no deadline).
    Failures raise the `nestkv.client.errors.StoreError` tree.

    A cluster: `with_client(target)` given any node reads the cluster's
    Topology and sends each operation to the node that owns its key, one
    pipeline per node (one batch in flight each), and `delete_all` to every
    node (see nestkv.client.routing). `GrpcStore(channel)` talks to the node
    its channel reaches, which forwards what other nodes own.
    """

    __slots__ = ("_connection", "_owns_channel", "_path")

    _connection: _Connection
    _owns_channel: bool
    _path: tuple[str, ...]

    def __init__(
        self,
        channel: Any,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
    ) -> None:
        """Wrap a grpc.aio channel you own; build it with `channel_options(max_value_bytes)` for sizes."""
        if channel is None:
            raise TypeError(
                "GrpcStore needs a grpc.aio channel; use GrpcStore.with_client(target) to open one"
            )
        self._connection = _Connection(
            channel=channel,
            max_value_bytes=_positive(max_value_bytes, "max_value_bytes"),
            timeout=timeout,
            max_batch_size=_batch_size(max_batch_size),
            max_batches_in_flight=_positive(max_batches_in_flight, "max_batches_in_flight"),
        )
        self._owns_channel = False
        self._path = ()

    @classmethod
    def with_client(
        cls,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> Self:
        """A root store that owns a channel to `target` ("host:port").

        Several addresses ("h1:50051,h2:50051", or a list) are seeds: the store
        talks to the first of them that accepts connections (a cluster's
        topology then names every node), so that it starts while some are down.

        Safe to call outside a running event loop: the channel opens on first use.
        `max_value_bytes` should match the server's --max-value-bytes: a larger
        value raises InvalidRequestError before anything is sent. `options`
        are extra grpc channel options, which override the defaults.

        `credentials` are gRPC channel credentials, such as
        `grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)`
        for TLS and mutual TLS; None: plaintext. `token` is sent with every
        call as `authorization: Bearer <token>` call credentials, which gRPC
        sends only over TLS, or in plaintext to a loopback address (local
        channel credentials): any other target without `credentials` raises ValueError.
        """
        targets = seed_targets(target)
        # gRPC uses the first occurrence of an option: the caller's come first.
        connection = _Connection(
            target=targets,
            credentials=_with_token(credentials, token, targets),
            options=[*options, *channel_options(max_value_bytes)],
            max_value_bytes=_positive(max_value_bytes, "max_value_bytes"),
            timeout=timeout,
            max_batch_size=_batch_size(max_batch_size),
            max_batches_in_flight=_positive(max_batches_in_flight, "max_batches_in_flight"),
        )
        return cls._derive(connection, (), owns_channel=True)

    @classmethod
    def _derive(cls, connection: _Connection, path: tuple[str, ...], *, owns_channel: bool) -> Self:
        store = cls.__new__(cls)
        store._connection = connection
        store._owns_channel = owns_channel
        store._path = path
        return store

    @property
    def path(self) -> tuple[str, ...]:
        """This store's namespace, as segments from the root."""
        return self._path

    def with_namespace(self, namespace: str) -> Self:
        path = (*self._path, check_segment(namespace))
        # The child shares the channel but never closes it: closing is the owner's job.
        return self._derive(self._connection, path, owns_channel=False)

    async def close(self) -> None:
        """Close the channel this store opened (with_client) in the running loop; otherwise do nothing.

        A closed store opens a new channel if it is used again.
        """
        if self._owns_channel:
            await self._connection.close()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        data = self._value_bytes(value)
        ttl = span_seconds(expires_in, "expires_in")
        await (await self._add_set(check_key(key), data, ttl))

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        renew = span_seconds(renew_for, "renew_for")
        return _value(await (await self._add_get(check_key(key), renew)))

    async def delete(self, key: str) -> None:
        await (await self._add_delete(check_key(key)))

    async def delete_all(self) -> None:
        seed, members = self._connection.every_node()
        if members is None:  # a single server, or a cluster not known yet: the node reaches the others
            operation, result = await self._add(0, pipeline=seed)
            _in_path(operation.delete_all, self._path)
            await result
            return
        results = {}
        for member, pipeline in members.items():
            operation, results[member] = await self._add(0, pipeline=pipeline)
            _in_path(operation.delete_all, self._path)
        outcomes = await asyncio.gather(*results.values(), return_exceptions=True)
        failed = {
            member: error
            for member, error in zip(results, outcomes, strict=True)
            if isinstance(error, BaseException)
        }
        if failed:
            for error in failed.values():
                if not isinstance(error, StoreError):
                    raise error
            raise StoreUnavailableError(
                f"UNAVAILABLE: delete_all did not reach {len(failed)} of {len(results)} nodes, whose keys "
                "remain: " + "; ".join(f"{member}: {error}" for member, error in failed.items()),
                "UNAVAILABLE",
                reason="UNREACHABLE",
                applied=None,  # the other nodes' keys are gone
            )

    async def exists(self, key: str) -> bool:
        operation, result = await self._add(len(check_key(key)), key)
        _in_path(operation.exists, self._path).key = key
        return bool((await result).exists.exists)

    async def expires_in(self, key: str) -> int | None:
        operation, result = await self._add(len(check_key(key)), key)
        _in_path(operation.expires_in, self._path).key = key
        response = (await result).expires_in
        if not response.found:
            return None
        if not response.HasField("expires_in"):
            return -1
        return whole_seconds(response.expires_in.seconds + response.expires_in.nanos / 1e9)

    async def increment(self, key: str, amount: int = 1, expires_in: int | timedelta | None = None) -> int:
        ttl = span_seconds(expires_in, "expires_in")
        check_amount(amount)
        operation, result = await self._add(len(check_key(key)) + 10, key)
        request = _in_path(operation.increment, self._path)
        request.key = key
        request.amount = amount
        if ttl is not None:
            _put_span(request.expires_in, ttl)
        return int((await result).increment.value)

    async def set_versioned(
        self,
        key: str,
        value: str | bytes,
        expires_in: int | timedelta | None = None,
        *,
        if_absent: bool = False,
        if_present: bool = False,
        if_version: bytes | None = None,
    ) -> bytes | None:
        condition, version = set_condition(if_absent, if_present, if_version)
        data = self._value_bytes(value)
        ttl = span_seconds(expires_in, "expires_in")
        operation, result = await self._add(len(check_key(key)) + len(data) + len(version), key)
        request = _in_path(operation.set, self._path)
        request.key = key
        request.value = data
        request.condition = _SET_CONDITION[condition]
        request.if_version = version
        if ttl is not None:
            _put_span(request.expires_in, ttl)
        response = (await result).set
        return response.version if response.stored else None

    async def get_with_version(self, key: str, renew_for: int | timedelta | None = None) -> Versioned | None:
        renew = span_seconds(renew_for, "renew_for")
        operation, result = await self._add(len(check_key(key)), key)
        request = _in_path(operation.get, self._path)
        request.key = key
        request.with_version = True
        if renew is not None:
            _put_span(request.renew_for, renew)
        response = (await result).get
        return Versioned(response.value, response.version) if response.found else None

    async def delete_if(
        self, key: str, *, version: bytes | None = None, value: str | bytes | None = None
    ) -> bool:
        check_key(key)
        if (version is None) == (value is None):
            raise ValueError("delete_if takes exactly one of version and value")
        if version is not None:
            condition = check_version(version)
        else:
            assert value is not None
            condition = self._value_bytes(value)
        operation, result = await self._add(len(key) + len(condition), key)
        request = _in_path(operation.delete, self._path)
        request.key = key
        if version is not None:
            request.if_version = condition
        else:
            request.if_value = condition
        return bool((await result).delete.deleted)

    async def stats(self) -> Stats:
        """Figures of this store's namespace with everything below it, and of the whole server.

        Cheap for the server (a lookup of the namespace): the figures are kept as the store changes.
        """
        try:
            response = await self._connection.stub().Stats(
                pb.StatsRequest(path=self._path), timeout=self._connection.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return stats_from_response(self._path, response)

    async def get_many(
        self, keys: Iterable[str], renew_for: int | timedelta | None = None
    ) -> list[bytes | None]:
        """The values of `keys`, in the same order, None for each key that is missing (as MGET).

        With `renew_for`, each key found with an expiry is renewed, as by `get`.
        """
        renew = span_seconds(renew_for, "renew_for")
        checked = [check_key(key) for key in keys]
        results = [await self._add_get(key, renew) for key in checked]
        return [_value(result) for result in await asyncio.gather(*results)]

    async def set_many(
        self,
        items: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]],
        expires_in: int | timedelta | None = None,
    ) -> None:
        """Store every (key, value) of `items`, each as by `set`, all with the same `expires_in`.

        Every key and value is checked before any is sent; if the server
        rejects one, the others are still stored and the first error is raised.
        """
        ttl = span_seconds(expires_in, "expires_in")
        pairs = items.items() if isinstance(items, Mapping) else items
        checked = [(check_key(key), self._value_bytes(value)) for key, value in pairs]
        await asyncio.gather(*[await self._add_set(key, data, ttl) for key, data in checked])

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key of `keys`, each as by `delete` (missing keys are no error)."""
        checked = [check_key(key) for key in keys]
        await asyncio.gather(*[await self._add_delete(key) for key in checked])

    def _value_bytes(self, value: str | bytes) -> bytes:
        """`value` as bytes, checked against max_value_bytes before anything is sent."""
        data = as_bytes(value)
        limit = self._connection.max_value_bytes
        if len(data) > limit:
            # Sent, it would fail in gRPC as RESOURCE_EXHAUSTED, which reads as "the store is full".
            raise InvalidRequestError(
                f"value is {len(data)} bytes; the limit is {limit} (max_value_bytes)",
                "INVALID_ARGUMENT",
                reason="INVALID_FIELD",
                applied=False,
            )
        return data

    async def _add(
        self, payload: int, key: str = "", pipeline: Pipeline | None = None
    ) -> tuple[pb.Operation, asyncio.Future[Any]]:
        """A new operation on `key`, in the pipeline of its node (or `pipeline`), once it has room;
        fill it in at once. (One coroutine per operation: with many callers in line, every object
        each holds is one more the garbage collector walks.)"""
        if pipeline is None:
            pipeline = self._connection.pipeline(self._path, key)
        deadline = pipeline.deadline()
        if pipeline.has_room():
            return pipeline.add(payload, deadline)
        turn = pipeline.line_up(deadline)
        try:
            await turn
        except BaseException:
            pipeline.leave_line(turn)
            raise
        return pipeline.add(payload, deadline, waited=True)

    async def _add_set(self, key: str, data: bytes, ttl: float | None) -> asyncio.Future[Any]:
        operation, result = await self._add(len(key) + len(data), key)
        request = _in_path(operation.set, self._path)
        request.key = key
        request.value = data
        if ttl is not None:
            _put_span(request.expires_in, ttl)
        return result

    async def _add_get(self, key: str, renew: float | None) -> asyncio.Future[Any]:
        operation, result = await self._add(len(key), key)
        request = _in_path(operation.get, self._path)
        request.key = key
        if renew is not None:
            _put_span(request.renew_for, renew)
        return result

    async def _add_delete(self, key: str) -> asyncio.Future[Any]:
        operation, result = await self._add(len(key), key)
        _in_path(operation.delete, self._path).key = key
        return result


def _in_path(request: Any, path: tuple[str, ...]) -> Any:
    """`request` (which holds a `path` field) with `path` set, and marked present in its Operation."""
    if path:
        request.path.extend(path)
    else:
        request.SetInParent()
    return request


def _with_token(
    credentials: grpc.ChannelCredentials | None, token: str | None, targets: Sequence[str]
) -> grpc.ChannelCredentials | None:
    """Channel credentials that also send `token` with every call."""
    if token is None:
        return credentials
    if not (isinstance(token, str) and token and token.isascii() and token.isprintable()) or " " in token:
        # gRPC refuses anything else as metadata, and only after the retries, as UNAVAILABLE.
        raise ValueError(
            "token must be a non-empty str of printable ASCII without spaces, "
            "as `nestkv-server token new` prints"
        )
    if credentials is None:
        refused = plaintext_token_refused(targets)
        if refused:
            raise ValueError(f"{refused}: pass credentials=grpc.ssl_channel_credentials(...)")
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


def _batch_size(number: int) -> int:
    """`max_batch_size`, checked against what a server takes by default: bulk calls (set_many and
    the others) are cut into batches of at most this many operations."""
    if _positive(number, "max_batch_size") > MAX_BATCH_SIZE:
        raise ValueError(
            f"max_batch_size is {number}; the limit is {MAX_BATCH_SIZE} (a server's default "
            "--max-batch-operations, which refuses larger batches)"
        )
    return number


def _positive(number: int, name: str) -> int:
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"{name} must be a positive int, got {number!r}")
    return number


def _put_span(field: Any, seconds: float) -> None:
    whole = int(seconds)
    field.seconds = whole
    field.nanos = min(round((seconds - whole) * 1e9), 999_999_999)


def _value(result: Any) -> bytes | None:
    """The value of a `get` OperationResult, None if the key was missing."""
    return result.get.value if result.get.found else None
