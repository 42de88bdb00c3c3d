"""Coalescing in GrpcStore: what travels together, the bounds, back-pressure, failures, bulk methods.

A real grpc.aio server runs the real servicer; its Pipeline handler only
records the batches it receives and can hold back its answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from nestkv.client import GrpcStore, InvalidRequestError, StoreProtocolError, StoreTimeoutError
from nestkv.server.security import Grant
from nestkv.server.storage import NamespacedStorage
from tests.inprocess import local_servicer
from tests.serverproc import ServerProcess


class RecordingServer:
    """Records the size of every batch as it arrives; answers only while `answering` is set."""

    def __init__(self) -> None:
        self.storage = NamespacedStorage()
        self.servicer = local_servicer(self.storage)
        self.batches: list[int] = []
        self.answering = asyncio.Event()
        self.answering.set()
        self.fail_batches: set[int] = set()  # 1-based numbers of batches to end the stream on
        self.overanswer_batches: set[int] = (
            set()
        )  # 1-based numbers of batches answered with a result too many
        self.keys: list[str] = []  # of the set operations, in the order they arrived
        self.arrived = asyncio.Event()

    async def wait_for_batches(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.batches) < count:
                self.arrived.clear()
                await self.arrived.wait()

    async def _pipeline(
        self, requests: AsyncIterator[Any], context: Any, admit: Callable[[Any], Grant]
    ) -> AsyncIterator[Any]:
        received: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            async for request in requests:
                self.batches.append(len(request.operations))
                self.keys += [op.set.key for op in request.operations if op.WhichOneof("operation") == "set"]
                self.arrived.set()
                received.put_nowait((len(self.batches), request))

        reader = asyncio.create_task(read())
        try:
            while True:
                number, request = await received.get()
                await self.answering.wait()
                if number in self.fail_batches:
                    await context.abort(grpc.StatusCode.INTERNAL, f"injected failure of batch {number}")
                for response in await self.servicer.run_batch(request):
                    if number in self.overanswer_batches:
                        response.results.add().CopyFrom(response.results[-1])
                    yield response
        finally:
            reader.cancel()

    async def start(self) -> tuple[Any, str]:
        server = grpc.aio.server()
        self.servicer.pipeline = self._pipeline  # type: ignore[method-assign]
        self.servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingServer, str]]:
    fake = RecordingServer()
    server, target = await fake.start()
    yield fake, target
    await server.stop(None)


async def test_a_lone_operation_travels_alone(recording: tuple[RecordingServer, str]) -> None:
    fake, target = recording
    async with GrpcStore.with_client(target) as store:
        await store.set("key", b"v")
        assert await store.get("key") == b"v"
    assert fake.batches == [1, 1]


async def test_concurrent_operations_share_one_batch(recording: tuple[RecordingServer, str]) -> None:
    fake, target = recording
    async with GrpcStore.with_client(target) as store:
        await asyncio.gather(*(store.set(f"k{i}", str(i)) for i in range(200)))
        values = await asyncio.gather(*(store.get(f"k{i}") for i in range(200)))
    assert values == [str(i).encode() for i in range(200)]
    assert fake.batches == [200, 200]


async def test_batches_are_capped_at_max_batch_size(recording: tuple[RecordingServer, str]) -> None:
    fake, target = recording
    async with GrpcStore.with_client(target, max_batch_size=16) as store:
        await asyncio.gather(*(store.set(f"k{i}", b"v") for i in range(100)))
    assert fake.batches == [16] * 6 + [4]
    assert fake.storage.count() == 100


async def test_batches_in_flight_are_bounded_and_callers_wait(recording: tuple[RecordingServer, str]) -> None:
    fake, target = recording
    fake.answering.clear()
    async with GrpcStore.with_client(target, max_batch_size=10, max_batches_in_flight=2) as store:
        writes = [asyncio.create_task(store.set(f"k{i}", b"v")) for i in range(100)]
        await fake.wait_for_batches(2)
        await asyncio.sleep(0.2)
        assert fake.batches == [10, 10]  # no third batch while two are unanswered
        pipeline = store._connection.pipeline((), "k0")
        waiting = sum(len(batch.futures) for batch in pipeline._waiting)
        assert waiting <= 30  # back-pressure: the other callers wait before adding anything
        assert not any(write.done() for write in writes)
        fake.answering.set()
        await asyncio.gather(*writes)
    assert sum(fake.batches) == 100
    assert fake.storage.count() == 100


async def test_a_failed_batch_fails_exactly_its_operations(recording: tuple[RecordingServer, str]) -> None:
    fake, target = recording
    fake.fail_batches = {2}
    async with GrpcStore.with_client(target) as store:
        first = await asyncio.gather(*(store.set(f"a{i}", b"v") for i in range(5)), return_exceptions=True)
        second = await asyncio.gather(*(store.set(f"b{i}", b"v") for i in range(5)), return_exceptions=True)
        third = await asyncio.gather(*(store.set(f"c{i}", b"v") for i in range(5)), return_exceptions=True)
    assert first == [None] * 5
    assert all(isinstance(error, StoreProtocolError) for error in second)
    assert "injected failure of batch 2" in str(second[0])
    assert third == [None] * 5  # a new stream carries on
    assert fake.batches == [5, 5, 5]
    assert fake.storage.count(()) == 10


async def test_a_rejected_operation_fails_alone_in_its_batch(recording: tuple[RecordingServer, str]) -> None:
    fake, target = recording
    async with GrpcStore.with_client(target) as store:
        keys = [f"k{i}" for i in range(9)] + ["k" * 5000]
        results = await asyncio.gather(*(store.set(key, b"v") for key in keys), return_exceptions=True)
    assert fake.batches == [10]
    assert results[:9] == [None] * 9
    assert isinstance(results[9], InvalidRequestError)
    assert (results[9].reason, results[9].applied) == ("INVALID_FIELD", False)
    assert fake.storage.count() == 9


async def test_bulk_methods_keep_order_and_per_key_semantics(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target, max_batch_size=256) as root:
        store = root.with_namespace("bulk")
        await store.delete_all()
        keys = [f"key{i}" for i in range(3000)]
        await store.set_many({key: key.upper() for key in keys[:2000]}, expires_in=100)
        await store.set_many([(key, b"plain") for key in keys[2000:2500]])
        values = await store.get_many(keys)
        assert values[:2000] == [key.upper().encode() for key in keys[:2000]]
        assert values[2000:2500] == [b"plain"] * 500
        assert values[2500:] == [None] * 500
        assert await store.expires_in(keys[0]) == 100
        assert await store.expires_in(keys[2000]) == -1
        await store.get_many(keys[:10], renew_for=1000)
        assert await store.expires_in(keys[0]) == 1000
        assert await store.expires_in(keys[10]) == 100
        await store.delete_many(keys[:1500])
        assert await store.get_many([keys[0], keys[1499], keys[1500]]) == [None, None, b"KEY1500"]
        assert await store.get_many([]) == []


async def test_bulk_arguments_are_checked_before_anything_is_sent(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as root:
        store = root.with_namespace("bulk-checked")
        await store.delete_all()
        with pytest.raises(TypeError, match="value must be str or bytes"):
            await store.set_many([("good", b"v"), ("bad", 42)])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="expires_in must be positive"):
            await store.set_many({"good": b"v"}, expires_in=0)
        assert await store.get_many(["good", "bad"]) == [None, None]


async def test_values_larger_than_a_response_come_back_whole(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as root:
        store = root.with_namespace("large")
        values = {f"k{i}": bytes([i]) * 700_000 for i in range(6)}  # 4.2 MB: several responses
        await store.set_many(values)
        assert await store.get_many(list(values)) == list(values.values())


async def test_callers_waiting_for_room_go_in_order_and_are_woken_once(
    recording: tuple[RecordingServer, str],
) -> None:
    fake, target = recording
    fake.answering.clear()
    async with GrpcStore.with_client(target, max_batch_size=10, max_batches_in_flight=1) as store:
        writes = [asyncio.create_task(store.set(f"k{i:03d}", b"v")) for i in range(100)]
        await fake.wait_for_batches(1)
        await asyncio.sleep(0.1)
        assert fake.batches == [10]
        fake.answering.set()
        await asyncio.gather(*writes)
        pipeline = store._connection.pipeline((), "k0")
    assert fake.keys == [f"k{i:03d}" for i in range(100)]  # first come, first sent
    # The first 11 callers found room (a batch in flight and one filling); each of the others
    # was woken once, not once per answered batch.
    assert 0 < pipeline.wakeups <= 89


async def test_many_concurrent_callers_cost_the_event_loop_a_constant_per_operation(
    server: ServerProcess,
) -> None:
    # Every wake-up of a task is a callback the loop schedules with call_soon. One event
    # for all waiting callers made that n per answered batch (n^2 / batch size in all, and
    # throughput fell with n); callers woken once each keep it a constant per operation.
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_soon = loop.call_soon

    def counting_call_soon(*args: Any, **kwargs: Any) -> Any:
        nonlocal scheduled
        scheduled += 1
        return call_soon(*args, **kwargs)

    async with GrpcStore.with_client(server.target, max_batch_size=64, max_batches_in_flight=2) as store:
        await store.set("warm", b"up")
        loop.call_soon = counting_call_soon  # type: ignore[method-assign,assignment]
        try:
            await asyncio.gather(*(store.set(f"k{i}", b"v") for i in range(20_000)))
        finally:
            del loop.call_soon
        assert await store.get("k19999") == b"v"
    assert scheduled < 10 * 20_000


async def test_a_caller_still_waiting_for_room_at_its_deadline_fails_and_is_never_sent(
    recording: tuple[RecordingServer, str],
) -> None:
    fake, target = recording
    fake.answering.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with GrpcStore.with_client(target, timeout=0.5, max_batch_size=4, max_batches_in_flight=1) as store:
        results = await asyncio.gather(
            *(store.set(f"k{i:02d}", b"v") for i in range(40)), return_exceptions=True
        )
        elapsed = loop.time() - started
        fake.answering.set()
        await asyncio.sleep(0.2)
        assert all(isinstance(result, StoreTimeoutError) for result in results)
        assert elapsed < 1.0
        assert "no room to send within 0.5 s" in str(results[-1])
        # One batch went out; the one behind it and every caller in line timed out before sending.
        assert fake.keys == [f"k{i:02d}" for i in range(4)]
        await store.set("after", b"v")  # and the store carries on
    assert fake.keys[-1] == "after"


async def test_an_unexpected_error_in_the_pipeline_fails_its_operations_and_the_next_starts_afresh(
    recording: tuple[RecordingServer, str],
) -> None:
    fake, target = recording
    fake.overanswer_batches = {1}  # more results than operations: the client cannot place one
    async with GrpcStore.with_client(target, max_batch_size=1) as store:
        results = await asyncio.gather(*(store.set(f"a{i}", b"v") for i in range(3)), return_exceptions=True)
        assert results[0] is None  # answered before the surplus result
        assert all(
            isinstance(error, StoreProtocolError) for error in results[1:]
        )  # held: failed, not stranded
        assert "the client's pipeline failed: IndexError" in str(results[1])
        await store.set("b", b"v")
        assert await store.get("b") == b"v"


async def test_an_operation_that_timed_out_in_a_batch_not_yet_sent_is_left_out_of_it(
    recording: tuple[RecordingServer, str],
) -> None:
    fake, target = recording
    fake.answering.clear()
    async with GrpcStore.with_client(target, timeout=0.5, max_batches_in_flight=1) as store:
        first = asyncio.create_task(store.set("a", b"v"))  # on the stream, unanswered
        await fake.wait_for_batches(1)
        late = asyncio.create_task(store.set("b", b"v"))  # waits to be sent...
        await asyncio.sleep(0.3)
        later = asyncio.create_task(store.set("c", b"v"))  # ...and c joins its batch
        with pytest.raises(StoreTimeoutError):
            await late
        fake.answering.set()
        await later
        with pytest.raises(StoreTimeoutError):
            await first
    assert "b" not in fake.keys  # its caller was told it timed out: it must never be applied
    assert fake.keys[-1] == "c"
    assert fake.storage.get((), "b") is None
