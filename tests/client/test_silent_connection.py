"""A connection that goes silent without closing: every operation still ends by its deadline.

Between GrpcStore and a real server runs a TCP proxy that, on `stall()`,
stops forwarding bytes on the connections it has open while keeping both of
their sockets open: what a stuck peer or a half-open TCP connection looks
like from the client. Connections made after the stall are forwarded again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nestkv.client import GrpcStore, StoreTimeoutError, StoreUnavailableError
from tests.serverproc import ServerProcess

# Faster keepalive than the default (10 s + 5 s), within what the server permits (pings 1 s apart).
FAST_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1500),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.http2.ping_timeout_ms", 1000),
]


class StallingProxy:
    """A TCP proxy to 127.0.0.1:`upstream` whose open connections can be made to go silent."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.connections = 0
        self._stalled: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self) -> None:
        """Stop forwarding on every connection open now; their sockets stay open."""
        for stalled in self._stalled:
            stalled.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        stalled = asyncio.Event()
        self._stalled.append(stalled)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, stalled))
            self._tasks.add(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, stalled: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if stalled.is_set():
                    break
                sink.write(data)
                await sink.drain()
        if stalled.is_set():
            await asyncio.Future()  # silent: read nothing more, write nothing, close nothing


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[StallingProxy]:
    proxy = await StallingProxy(server.port).start()
    yield proxy
    await proxy.close()


async def test_every_operation_ends_by_its_deadline_and_then_moves_to_a_new_connection(
    proxy: StallingProxy,
) -> None:
    loop = asyncio.get_running_loop()
    async with GrpcStore.with_client(
        proxy.target, timeout=0.3, options=FAST_KEEPALIVE, max_batch_size=8, max_batches_in_flight=1
    ) as store:
        await store.set("before", b"kept")
        proxy.stall()

        async def timed(key: str) -> tuple[str, float]:
            started = loop.time()
            try:
                await store.get(key)
            except StoreTimeoutError:
                return "timeout", loop.time() - started
            return "answered", loop.time() - started

        # Far more callers than the batches in flight hold: most of them wait for room.
        outcomes = await asyncio.gather(*(timed(f"k{i}") for i in range(200)))
        assert {kind for kind, _ in outcomes} == {"timeout"}
        assert max(elapsed for _, elapsed in outcomes) < 0.3 + 0.5
        for _ in range(3):  # later calls end by their deadline too: nothing is left holding a slot
            kind, elapsed = await timed("before")
            assert elapsed < 0.3 + 0.5
            if kind == "answered":
                break
        # Keepalive finds the connection dead; the client moves to a new one on its own.
        async with asyncio.timeout(15):
            while True:
                try:
                    assert await store.get("before") == b"kept"
                    break
                except (StoreTimeoutError, StoreUnavailableError):
                    await asyncio.sleep(0.1)
    assert proxy.connections >= 2


async def test_default_keepalive_moves_a_waiting_operation_to_a_new_connection_within_30_s(
    proxy: StallingProxy,
) -> None:
    async with GrpcStore.with_client(proxy.target, timeout=None) as store:
        await store.set("before", b"kept")
        proxy.stall()
        async with asyncio.timeout(30):  # no deadline of its own: only keepalive can save it
            assert await store.get("before") == b"kept"
    assert proxy.connections == 2


async def test_the_server_permits_the_clients_keepalive_pings(proxy: StallingProxy) -> None:
    # A server that took the pings for abuse would answer GOAWAY (too_many_pings): a new connection.
    async with GrpcStore.with_client(proxy.target, options=FAST_KEEPALIVE) as store:
        await store.set("key", b"v")
        await asyncio.sleep(10)  # idle: pings, and nothing else (3 too early make a GOAWAY)
        assert await store.get("key") == b"v"
    assert proxy.connections == 1
