"""What the client does with an operation that must not run twice when its stream breaks after it
was sent: it fails it, its outcome unknown, instead of sending it again as it does a read."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from nestkv.client import GrpcStore, StoreUnavailableError
from nestkv.v1 import store_pb2_grpc
from nestkv.wire.pipeline import Pipeline
from tests.clusterproc import free_ports
from tests.faults import TcpProxy
from tests.serverproc import ServerProcess


async def test_an_increment_whose_stream_broke_is_not_sent_again_and_a_read_is() -> None:
    with ServerProcess() as server:
        [port] = free_ports(1)
        proxy = TcpProxy(port, server.port)
        await proxy.start()
        try:
            async with GrpcStore.with_client(f"127.0.0.1:{port}", timeout=10) as store:
                await store.set("n", b"5")
                server.process.send_signal(signal.SIGSTOP)  # it answers nothing: both stay unanswered
                try:
                    increment = asyncio.create_task(store.increment("n"))
                    conditional = asyncio.create_task(store.set_if_absent("lock", b"token"))
                    read = asyncio.create_task(store.get("n"))
                    await asyncio.sleep(0.3)
                    proxy.sever()  # the stream breaks after they were sent
                    proxy.heal()
                    for task in (increment, conditional):
                        with pytest.raises(StoreUnavailableError) as caught:
                            await task
                        # It may have run: the caller decides.
                        assert (caught.value.reason, caught.value.applied) == ("CONNECTION_LOST", None)
                    assert not read.done()  # sent again, on a new stream, and waiting for the server
                finally:
                    server.process.send_signal(signal.SIGCONT)
                assert await read in (b"5", b"6")
        finally:
            await proxy.close()


async def test_an_increment_on_a_stream_that_never_reached_a_server_is_not_applied() -> None:
    """A pipeline that does not wait for its channel (as the nodes' to each other do: a copy down
    sends its operations to the next one): its stream fails before it reached a server, so nothing
    was written to it, and an increment on it is certain not to have run anywhere."""
    [port] = free_ports(1)  # nothing listens there: every connection is refused
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        pipeline = Pipeline(stub.Pipeline, timeout=5)
        operation, result = pipeline.add(8, pipeline.deadline())
        operation.increment.key = "n"
        with pytest.raises(StoreUnavailableError) as caught:
            await result
        await pipeline.close()
    assert (caught.value.reason, caught.value.applied) == ("UNREACHABLE", False)
