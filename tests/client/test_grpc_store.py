"""GrpcStore beyond the shared contract: channel ownership, event loops, deadlines, errors, retries."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from nestkv.client import (
    AuthenticationError,
    GrpcStore,
    InvalidRequestError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    channel_options,
)
from nestkv.server.security import Grant
from nestkv.server.storage import NamespacedStorage
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from nestkv.wire.pipeline import _MAX_ATTEMPTS as MAX_ATTEMPTS
from nestkv.wire.pipeline import Pipeline, backoff
from tests.inprocess import local_servicer
from tests.pki import AuthFile
from tests.serverproc import ServerProcess


def test_with_client_works_outside_a_loop_and_in_each_new_loop(server: ServerProcess) -> None:
    store = GrpcStore.with_client(server.target)  # no loop is running here, as at import time

    async def write_then_read(value: bytes) -> bytes | None:
        await store.set("loops", value)
        return await store.get("loops")

    assert asyncio.run(write_then_read(b"first loop")) == b"first loop"
    assert asyncio.run(write_then_read(b"second loop")) == b"second loop"


async def test_closing_a_child_never_closes_the_parents_channel(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as root:
        child = root.with_namespace("child")
        async with child.with_namespace("grandchild") as grandchild:
            await grandchild.set("key", b"v")
        await child.close()
        await root.set("key", b"parent still works")
        assert await root.get("key") == b"parent still works"
        assert await child.with_namespace("grandchild").get("key") == b"v"
    assert root._connection._by_loop == {}  # leaving `async with` closed the channel the root owns


async def test_a_callers_channel_is_never_closed_by_the_store(server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server.target, options=channel_options()) as channel:
        async with GrpcStore(channel) as store:
            await store.set("key", b"v")
        await store.close()
        raw = store_pb2_grpc.StoreServiceStub(channel)
        response = await raw.Get(pb.GetRequest(key="key"))
        assert response.value == b"v"


async def test_a_closed_store_reopens_on_next_use(server: ServerProcess) -> None:
    store = GrpcStore.with_client(server.target)
    await store.set("key", b"v")
    await store.close()
    assert await store.get("key") == b"v"
    await store.close()


async def test_store_knows_its_path(server: ServerProcess) -> None:
    store = GrpcStore.with_client(server.target)
    assert store.with_namespace("a").with_namespace("b").path == ("a", "b")
    assert store.path == ()


async def test_unreachable_server_raises_store_unavailable() -> None:
    with ServerProcess() as gone:
        target = gone.target
    async with GrpcStore.with_client(target, timeout=10) as store:
        with pytest.raises(StoreUnavailableError) as caught:
            await store.get("key")
    assert isinstance(caught.value, StoreError)
    assert caught.value.code == "UNAVAILABLE"
    assert not isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


async def test_a_refusing_server_is_tried_again_with_backoff_then_given_up_on() -> None:
    with ServerProcess() as gone:
        target = gone.target  # nothing listens there any more: every connection is refused
    loop = asyncio.get_running_loop()
    opened: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)

        def open_stream() -> Any:
            opened.append(loop.time())
            return stub.Pipeline()

        pipeline = Pipeline(open_stream, timeout=None)
        operation, result = pipeline.add(1, None)
        operation.get.key = "k"
        with pytest.raises(StoreUnavailableError):
            await result
    assert len(opened) == MAX_ATTEMPTS
    gaps = [later - earlier for earlier, later in itertools.pairwise(opened)]
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= 0.9 * backoff(attempt)
    assert [backoff(attempt) for attempt in range(1, 8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_server_rejection_raises_invalid_request(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as store:
        with pytest.raises(InvalidRequestError) as caught:
            await store.exists("k" * 5000)
    assert isinstance(caught.value, ValueError)
    error = caught.value
    assert (error.code, error.reason, error.applied) == ("INVALID_ARGUMENT", "INVALID_FIELD", False)


@pytest.mark.words
async def test_server_rejection_names_the_limit(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as store:
        limit = r"key is 5000 bytes; the limit is 4096 \(max_key_bytes\)"
        with pytest.raises(InvalidRequestError, match=limit):
            await store.exists("k" * 5000)


async def test_cancelled_caller_leaves_the_store_usable(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as store:
        await store.set("key", b"v")
        calls = [asyncio.create_task(store.get("key")) for _ in range(20)]
        calls[3].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 3] == [b"v"] * 19


class FlakyServer:
    """A real grpc.aio server running the real servicer, with faults injected in its Pipeline stream.

    Every batch waits `delay` seconds first; the first `failures` batches end
    their stream with `code` instead of an answer.
    """

    def __init__(self, failures: int, code: grpc.StatusCode, delay: float = 0.0) -> None:
        self.failures = failures
        self.code = code
        self.delay = delay
        self.attempts = 0
        self.servicer = local_servicer(NamespacedStorage())

    async def _pipeline(
        self, requests: AsyncIterator[Any], context: Any, admit: Callable[[Any], Grant]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            self.attempts += 1
            await asyncio.sleep(self.delay)
            if self.attempts <= self.failures:
                await context.abort(self.code, "injected failure")
            for response in await self.servicer.run_batch(request):
                yield response

    async def start(self) -> tuple[Any, int]:
        server = grpc.aio.server()
        self.servicer.pipeline = self._pipeline  # type: ignore[method-assign]
        self.servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyServer, str]]:
    fault = FlakyServer(failures=2, code=grpc.StatusCode.UNAVAILABLE)
    server, port = await fault.start()
    yield fault, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_unavailable_is_retried_with_backoff(flaky: tuple[FlakyServer, str]) -> None:
    fault, target = flaky
    async with GrpcStore.with_client(target) as store:
        await store.set("key", b"v")
        assert fault.attempts == 3  # two injected UNAVAILABLE, then success
        assert await store.get("key") == b"v"


async def test_bad_arguments_fail_before_any_rpc() -> None:
    with ServerProcess() as gone:
        target = gone.target
    store = GrpcStore.with_client(target)  # nothing listens: an RPC would raise StoreUnavailableError
    with pytest.raises(ValueError, match="expires_in must be positive"):
        await store.set("key", b"v", expires_in=-1)
    with pytest.raises(ValueError, match="renew_for must be positive"):
        await store.get("key", renew_for=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="namespace must be a non-empty string"):
        store.with_namespace("")
    with pytest.raises(TypeError, match="value must be str or bytes"):
        await store.set("key", 42)  # type: ignore[arg-type]
    assert store._connection._by_loop == {}  # no channel was even opened


async def test_a_value_over_max_value_bytes_is_refused_before_anything_is_sent() -> None:
    with ServerProcess() as gone:
        target = gone.target  # nothing listens: a call would fail as unavailable, not as too large
    store = GrpcStore.with_client(target, max_value_bytes=1000)
    with pytest.raises(
        InvalidRequestError, match=r"value is 1001 bytes; the limit is 1000 \(max_value_bytes\)"
    ) as caught:
        await store.set("key", b"v" * 1001)
    assert (caught.value.reason, caught.value.applied) == ("INVALID_FIELD", False)  # as the server's
    with pytest.raises(ValueError, match="value is 1003 bytes"):
        await store.with_namespace("ns").set_many([("small", b"v"), ("big", "é" * 501 + "v")])
    assert store._connection._by_loop == {}  # no channel was even opened


async def test_values_up_to_max_value_bytes_are_stored(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target, max_value_bytes=1000) as store:
        await store.set("fits", b"v" * 1000)
        assert await store.get("fits") == b"v" * 1000
        with pytest.raises(InvalidRequestError):
            await store.set("fits", b"v" * 1001)
        assert await store.get("fits") == b"v" * 1000


async def test_deadline_raises_store_timeout(flaky: tuple[FlakyServer, str]) -> None:
    fault, target = flaky
    fault.delay = 5.0
    async with GrpcStore.with_client(target, timeout=0.2) as store:
        with pytest.raises(StoreTimeoutError) as caught:
            await store.get("key")
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert fault.attempts == 1  # a deadline is not retried


async def test_other_errors_are_not_retried(flaky: tuple[FlakyServer, str]) -> None:
    fault, target = flaky
    fault.code = grpc.StatusCode.INTERNAL
    async with GrpcStore.with_client(target) as store:
        with pytest.raises(StoreError, match="INTERNAL: injected failure"):
            await store.set("key", b"v")
        assert fault.attempts == 1


async def test_callers_channel_options_override_the_defaults(server: ServerProcess) -> None:
    options = [("grpc.max_receive_message_length", 100)]
    async with GrpcStore.with_client(server.target, options=options) as store:
        await store.set("big", b"x" * 1000)
        with pytest.raises(StoreError, match="larger than max"):
            await store.get("big")


def test_one_store_serves_two_live_loops_with_a_channel_each(server: ServerProcess) -> None:
    store = GrpcStore.with_client(server.target)  # as an app's store, also used by the test's own loop
    with asyncio.Runner() as app_loop, asyncio.Runner() as test_loop:
        app_loop.run(store.set("from-app", b"a"))
        test_loop.run(store.set("from-test", b"t"))
        for _ in range(3):
            assert app_loop.run(store.get("from-test")) == b"t"
            assert test_loop.run(store.get("from-app")) == b"a"
        assert len(store._connection._by_loop) == 2  # reused, not reopened at each switch
        app_loop.run(store.close())
        test_loop.run(store.close())
    assert store._connection._by_loop == {}


def test_wrapping_no_channel_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"use GrpcStore\.with_client"):
        GrpcStore(None)


@pytest.mark.parametrize("token", ["", "tök", "a b", "a\x01b", "a\nb"])
def test_a_token_grpc_cannot_send_is_refused_before_any_call(token: str) -> None:
    with pytest.raises(ValueError, match="token must be a non-empty str of printable ASCII without spaces"):
        GrpcStore.with_client("127.0.0.1:50051", token=token)


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "nestkv.internal:50051", "[::]:50051", "localhost.:1"])
def test_a_token_goes_in_plaintext_only_to_a_loopback_address(target: str) -> None:
    with pytest.raises(
        ValueError, match="a token is sent only over TLS, or in plaintext to a loopback address"
    ):
        GrpcStore.with_client(target, token="nkv_x")


async def test_a_token_reaches_a_loopback_server_without_tls(tmp_path: Path) -> None:
    """gRPC sends call credentials over local channel credentials: plaintext, peer checked to be local."""
    auth_file = AuthFile(tmp_path / "tokens.toml")
    token = auth_file.mint("local", ["local"])
    with ServerProcess("--auth-file", str(auth_file.path)) as server:
        for host in ("127.0.0.1", "localhost"):
            target = f"{host}:{server.port}"
            async with GrpcStore.with_client(target, token=token) as store:
                await store.set("k", b"v")
                assert (await store.stats()).namespace.keys == 1  # under ["local"]: the token arrived
            async with GrpcStore.with_client(target) as store:
                with pytest.raises(AuthenticationError):
                    await store.get("k")
