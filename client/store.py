"""GrpcStore: the Store API over gRPC, one namespace path per store object."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Self

import grpc

from client._arguments import as_bytes, check_key, check_segment, span_seconds, whole_seconds
from client.base import NamespacedStore
from client.errors import error_from_rpc
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["StoreService"].full_name

# Every StoreService RPC is idempotent (Set writes the same value, Delete and
# DeleteAll remove the same keys), so UNAVAILABLE, which gRPC raises when a
# call could not be delivered, is retried with exponential backoff.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> list[tuple[str, Any]]:
    """Channel options GrpcStore needs: message sizes that fit `max_value_bytes`, and the retry policy.

    Pass them to `grpc.aio.insecure_channel` / `secure_channel` when you build the channel yourself.
    """
    message_bytes = max_value_bytes + 1024 * 1024  # room for the key, path and framing
    return [
        ("grpc.max_send_message_length", message_bytes),
        ("grpc.max_receive_message_length", message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
    ]


class _Connection:
    """The channels shared by a root store and every store derived from it by with_namespace.

    A grpc.aio channel belongs to the event loop it was made in, so an owned
    connection opens one channel per loop, lazily, on first use in that loop:
    a store built at import time works, and so does one used both by a test
    and by an app running in a test client's own loop.
    """

    __slots__ = ("_by_loop", "_callers_stub", "_options", "_target")

    def __init__(
        self, *, channel: Any = None, target: str = "", options: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self._target = target
        self._options = list(options)
        self._callers_stub: Any = None if channel is None else store_pb2_grpc.StoreServiceStub(channel)
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}

    def stub(self) -> Any:
        """The stub to call with in the running loop."""
        if self._callers_stub is not None:
            return self._callers_stub
        loop = asyncio.get_running_loop()
        opened = self._by_loop.get(loop)
        if opened is None:
            # Forget channels of loops that are gone: they cannot be used or closed any more.
            self._by_loop = {old: pair for old, pair in self._by_loop.items() if not old.is_closed()}
            channel = grpc.aio.insecure_channel(self._target, options=self._options)
            opened = self._by_loop[loop] = (channel, store_pb2_grpc.StoreServiceStub(channel))
        return opened[1]

    async def close(self) -> None:
        """Close the channel opened in the running loop; a caller's channel is never closed."""
        opened = self._by_loop.pop(asyncio.get_running_loop(), None)
        if opened is not None:
            await opened[0].close()


class GrpcStore(NamespacedStore):
    """A NamespacedStore served by a nestkv server over gRPC.

    Build one with `GrpcStore.with_client(target)`, which owns its channel
    (opened lazily, in the event loop that first uses the store) and closes it
    on `close()` / `async with` exit; or with `GrpcStore(channel)`, which uses
    a grpc.aio channel you own and never closes it. Stores made by
    `with_namespace` share their parent's channel and never close it.

    Every call has a deadline of `timeout` seconds (None: no deadline).
    Failures raise the `client.errors.StoreError` tree.
    """

    __slots__ = ("_connection", "_owns_channel", "_path", "_timeout")

    _connection: _Connection
    _owns_channel: bool
    _path: tuple[str, ...]
    _timeout: float | None

    def __init__(self, channel: Any, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Wrap a grpc.aio channel you own; build it with `channel_options()` for retries and sizes."""
        if channel is None:
            raise TypeError(
                "GrpcStore needs a grpc.aio channel; use GrpcStore.with_client(target) to open one"
            )
        self._connection = _Connection(channel=channel)
        self._owns_channel = False
        self._path = ()
        self._timeout = timeout

    @classmethod
    def with_client(
        cls,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Self:
        """A root store that owns an insecure channel to `target` ("host:port").

        Safe to call outside a running event loop: the channel opens on first use.
        `max_value_bytes` should match the server's --max-value-bytes; `options`
        are extra grpc channel options, which override the defaults.
        """
        # gRPC uses the first occurrence of an option: the caller's come first.
        connection = _Connection(target=target, options=[*options, *channel_options(max_value_bytes)])
        return cls._derive(connection, (), timeout, owns_channel=True)

    @classmethod
    def _derive(
        cls, connection: _Connection, path: tuple[str, ...], timeout: float | None, *, owns_channel: bool
    ) -> Self:
        store = cls.__new__(cls)
        store._connection = connection
        store._owns_channel = owns_channel
        store._path = path
        store._timeout = timeout
        return store

    @property
    def path(self) -> tuple[str, ...]:
        """This store's namespace, as segments from the root."""
        return self._path

    def with_namespace(self, namespace: str) -> Self:
        path = (*self._path, check_segment(namespace))
        # The child shares the channel but never closes it: closing is the owner's job.
        return self._derive(self._connection, path, self._timeout, owns_channel=False)

    async def close(self) -> None:
        """Close the channel this store opened (with_client) in the running loop; otherwise do nothing.

        A closed store opens a new channel if it is used again.
        """
        if self._owns_channel:
            await self._connection.close()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        request = pb.SetRequest(path=self._path, key=check_key(key), value=as_bytes(value))
        _put_span(request.expires_in, span_seconds(expires_in, "expires_in"))
        await self._call(self._connection.stub().Set, request)

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        request = pb.GetRequest(path=self._path, key=check_key(key))
        _put_span(request.renew_for, span_seconds(renew_for, "renew_for"))
        response: pb.GetResponse = await self._call(self._connection.stub().Get, request)
        return response.value if response.found else None

    async def delete(self, key: str) -> None:
        await self._call(
            self._connection.stub().Delete, pb.DeleteRequest(path=self._path, key=check_key(key))
        )

    async def delete_all(self) -> None:
        await self._call(self._connection.stub().DeleteAll, pb.DeleteAllRequest(path=self._path))

    async def exists(self, key: str) -> bool:
        request = pb.ExistsRequest(path=self._path, key=check_key(key))
        response: pb.ExistsResponse = await self._call(self._connection.stub().Exists, request)
        return response.exists

    async def expires_in(self, key: str) -> int | None:
        request = pb.ExpiresInRequest(path=self._path, key=check_key(key))
        response: pb.ExpiresInResponse = await self._call(self._connection.stub().ExpiresIn, request)
        if not response.found:
            return None
        if not response.HasField("expires_in"):
            return -1
        return whole_seconds(response.expires_in.seconds + response.expires_in.nanos / 1e9)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None


def _put_span(field: Any, seconds: float | None) -> None:
    if seconds is not None:
        whole = int(seconds)
        field.seconds = whole
        field.nanos = min(round((seconds - whole) * 1e9), 999_999_999)
