"""One caller's big batches do not freeze a node for the others (real servers, raw Pipeline streams).

The shape of the finding: Pipeline batches of `exists`, hundreds of thousands of operations, sent
back to back to one node of three, two thirds of them owned (so forwarded) elsewhere, while another
tenant reads through the same node. How long the other caller waits is measured by `make bench`
(bench/fairness.py); here, what must hold whatever the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import grpc
import pytest

from nestkv.client import GrpcStore, channel_options
from nestkv.server.batches import SLICE_OPERATIONS
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.clusterproc import ClusterProcesses
from tests.serverproc import ServerProcess, server_command

LIMIT = 10_000  # --max-batch-operations' default


def exists_batch(batch_id: int, count: int, prefix: str = "k") -> pb.PipelineRequest:
    return pb.PipelineRequest(
        id=batch_id,
        operations=[
            pb.Operation(exists=pb.ExistsRequest(path=["flood"], key=f"{prefix}{n}")) for n in range(count)
        ],
    )


@contextlib.asynccontextmanager
async def stub_of(target: str) -> AsyncIterator[store_pb2_grpc.StoreServiceStub]:
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        yield store_pb2_grpc.StoreServiceStub(channel)


async def test_a_batch_over_the_limit_is_refused_naming_it_and_the_server_serves_on() -> None:
    too_low = server_command("--max-batch-operations", "511").stderr
    assert "Expected `int` >= 512 - at `--max-batch-operations`" in too_low
    with ServerProcess("--max-batch-operations", "600") as server:
        async with stub_of(server.target) as stub:
            call = stub.Pipeline()
            await call.write(exists_batch(1, 601))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == (
                "batch has 601 operations; the limit is 600 (max_batch_operations): "
                "send it as several batches"
            )
            call = stub.Pipeline()
            await call.write(exists_batch(2, 600))
            answered = 0
            while answered < 600:
                answered += len((await call.read()).results)
            call.cancel()
        # GrpcStore's bulk calls cut their batches to fit (at most max_batch_size, 512 by default).
        async with GrpcStore.with_client(server.target) as store:
            await store.set_many({f"k{n}": b"v" for n in range(1_000)})
            assert await store.get_many([f"k{n}" for n in range(1_000)]) == [b"v"] * 1_000


def test_the_shape_of_the_finding_is_refused_by_default() -> None:
    # 400,000 exists in one batch held another tenant's get for 12.8 s; the default limit refuses it.
    with pytest.raises(ValueError, match=r"max_batch_size is 400000; the limit is 10000"):
        GrpcStore.with_client("127.0.0.1:1", max_batch_size=400_000)


async def test_a_large_batch_is_answered_a_slice_at_a_time() -> None:
    # Each slice is run, answered and followed by a yield to the event loop before the next.
    with ServerProcess() as server:
        async with stub_of(server.target) as stub:
            call = stub.Pipeline()
            await call.write(exists_batch(1, LIMIT))
            sizes: list[int] = []
            while sum(sizes) < LIMIT:
                response = await call.read()
                assert response.id == 1
                sizes.append(len(response.results))
            call.cancel()
    assert len(sizes) == math.ceil(LIMIT / SLICE_OPERATIONS)
    assert max(sizes) == SLICE_OPERATIONS


async def flood_and_probe(flooded: str, prober: GrpcStore, batches: int) -> int:
    """Send `batches` batches of LIMIT exists back to back on one stream to `flooded`, and read
    through `prober` from the flood's first answer on: how many reads were answered before the
    flood's last answer came."""
    await prober.set("probe", b"here")
    async with stub_of(flooded) as stub:
        call = stub.Pipeline()
        started, finished = asyncio.Event(), asyncio.Event()

        async def send() -> None:
            for batch in range(batches):
                await call.write(exists_batch(batch + 1, LIMIT, prefix=f"b{batch}-"))
            await call.done_writing()

        async def receive() -> None:
            results = 0
            while results < batches * LIMIT:
                response = await call.read()
                results += len(response.results)
                started.set()
            finished.set()

        flood = asyncio.gather(send(), receive())
        await started.wait()  # the flood is being run: now the other tenant reads
        answered = 0
        while not finished.is_set():
            assert await prober.get("probe") == b"here"
            answered += not finished.is_set()
        await flood
    return answered


async def test_another_tenant_reads_while_a_flood_of_batches_runs_on_its_node() -> None:
    with ServerProcess() as server:
        async with GrpcStore.with_client(server.target) as prober:
            during = await flood_and_probe(server.target, prober.with_namespace("other"), batches=20)
    assert during >= 5, f"only {during} reads were answered while 200,000 operations ran"


async def test_another_tenant_reads_through_a_node_while_a_forwarded_flood_runs_on_it(
    cluster: ClusterProcesses,
) -> None:
    # Pinned to node-0 as the flood is: two thirds of the flood go from node-0 to the others.
    target = cluster.target("node-0")
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        prober = GrpcStore(channel).with_namespace("other")
        during = await flood_and_probe(target, prober, batches=10)
        await prober.delete_all()
    assert during >= 5, f"only {during} reads were answered while 100,000 operations ran"
