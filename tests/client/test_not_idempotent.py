"""What the client does with an operation that must not run twice when its stream breaks after it
was sent: it fails it, its outcome unknown, instead of sending it again as it does a read."""

from __future__ import annotations

import asyncio
import signal

import pytest

from nestkv.client import GrpcStore, StoreUnavailableError
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
                        with pytest.raises(StoreUnavailableError, match="not sent again") as caught:
                            await task
                        assert caught.value.applied is None  # it may have run: the caller decides
                    assert not read.done()  # sent again, on a new stream, and waiting for the server
                finally:
                    server.process.send_signal(signal.SIGCONT)
                assert await read in (b"5", b"6")
        finally:
            await proxy.close()
