"""A client across a restart of its server: calls wait for the server within their deadline, a
refused connection is "not applied", and the client is back as soon as the server accepts again."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from pathlib import Path

import pytest

from nestkv.client import GrpcStore, StoreError
from tests.clusterproc import free_ports
from tests.serverproc import ServerProcess

DOWN_FOR = 0.8
"""Seconds between the server's exit and its start again: long enough for gRPC's reconnect backoff
to grow (it starts at 0.1 s), as under Kubernetes, where a pod's restart takes a second or more."""


async def test_writes_go_on_across_a_restart_of_the_server_and_resume_once_it_accepts(tmp_path: Path) -> None:
    [port] = free_ports(1)
    args = ("--port", str(port), "--data-dir", str(tmp_path))
    server = ServerProcess(*args).start()
    done: list[tuple[float, int]] = []  # when each increment was answered, and its sum
    failed: list[StoreError] = []
    stop = asyncio.Event()
    try:
        async with GrpcStore.with_client(server.target, timeout=10) as store:

            async def write() -> None:
                while not stop.is_set():
                    try:
                        done.append((time.monotonic(), await store.increment("counter")))
                    except StoreError as error:
                        failed.append(error)

            writer = asyncio.create_task(write())
            await asyncio.sleep(0.3)
            assert server.stop(signal.SIGTERM) == 0
            await asyncio.sleep(DOWN_FOR)
            server = await asyncio.to_thread(ServerProcess(*args).start)  # its ready line: it accepts
            accepting = time.monotonic()
            await asyncio.sleep(1)
            stop.set()
            await writer
            final = await store.get("counter")
    finally:
        server.stop()
    # Nothing failed: every increment that met the server down waited for it (refused connections
    # send nothing), and none counted twice or went missing.
    assert failed == []
    assert [total for _, total in done] == list(range(1, len(done) + 1))
    assert final == str(len(done)).encode()
    # Back within 300 ms of the server accepting connections (a margin for a loaded machine).
    back = min((answered - accepting for answered, _ in done if answered >= accepting), default=math.inf)
    assert back < 0.5, f"no write answered within {back:.2f} s of the server accepting connections"


async def test_an_operation_that_never_reached_a_server_fails_as_not_applied_and_one_waits_for_it() -> None:
    [port] = free_ports(1)  # nothing listens there yet: every connection is refused
    async with GrpcStore.with_client(f"127.0.0.1:{port}", timeout=0.5) as store:
        with pytest.raises(StoreError) as failed:
            await store.increment("counter")
        assert failed.value.applied is False
        assert failed.value.code == "UNAVAILABLE"
        await asyncio.sleep(0.2)
        assert store._connection.every_node()[0]._driver is None  # nothing left waiting: it rests
    async with GrpcStore.with_client(f"127.0.0.1:{port}", timeout=10) as store:
        waiting = asyncio.create_task(store.increment("counter"))
        await asyncio.sleep(0.5)
        with ServerProcess("--port", str(port)):  # it comes up within the deadline: the call goes
            assert await waiting == 1


async def test_a_store_given_several_addresses_starts_while_the_first_is_down() -> None:
    [down] = free_ports(1)
    with ServerProcess() as server:
        began = time.monotonic()
        async with GrpcStore.with_client(f"127.0.0.1:{down}, {server.target}", timeout=5) as store:
            await store.set("k", b"v")
        assert time.monotonic() - began < 2.5, "it waited for the address that is down"
        async with GrpcStore.with_client([f"127.0.0.1:{down}", server.target], timeout=5) as store:
            assert await store.get("k") == b"v"
            assert (await store.stats()).server.keys == 1  # the one-operation RPCs too
    with pytest.raises(ValueError, match="at least one address"):
        GrpcStore.with_client([])
    with pytest.raises(ValueError, match=r"'example\.com:50051' is neither"):
        GrpcStore.with_client("127.0.0.1:50051,example.com:50051", token="secret")
