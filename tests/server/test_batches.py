"""Batches run directly (StoreServicer.run_batch, through the BatchRunner): how a batch's results are
cut into responses, and counted."""

from __future__ import annotations

import pytest

from nestkv.server.batches import SLICE_OPERATIONS
from nestkv.server.errors import StoreUnavailable
from nestkv.server.metrics import OperationMetrics
from nestkv.server.storage import NamespacedStorage
from nestkv.v1 import store_pb2 as pb
from tests.inprocess import local_servicer


async def test_results_too_large_for_one_response_continue_in_the_next() -> None:
    servicer = local_servicer(NamespacedStorage(), chunk_bytes=1000)
    sizes = [400, 400, 400, 5000, 10, 10]
    setup = pb.PipelineRequest(
        operations=[
            pb.Operation(set=pb.SetRequest(key=f"k{i}", value=b"x" * size)) for i, size in enumerate(sizes)
        ]
    )
    await servicer.run_batch(setup)
    request = pb.PipelineRequest(
        id=9, operations=[pb.Operation(get=pb.GetRequest(key=f"k{i}")) for i in range(6)]
    )
    responses = await servicer.run_batch(request)
    assert [response.id for response in responses] == [9, 9, 9, 9]
    assert [[len(r.get.value) for r in response.results] for response in responses] == [
        [400, 400],
        [400],
        [5000],  # a value larger than the chunk travels alone
        [10, 10],
    ]


async def test_a_slice_of_small_results_is_one_response() -> None:
    servicer = local_servicer(NamespacedStorage())
    request = pb.PipelineRequest(
        id=1, operations=[pb.Operation(get=pb.GetRequest(key="k"))] * SLICE_OPERATIONS
    )
    responses = await servicer.run_batch(request)
    assert len(responses) == 1
    assert len(responses[0].results) == SLICE_OPERATIONS


def counted(metrics: OperationMetrics) -> dict[tuple[str, str], int]:
    return {key: count for key, count in metrics.counts.items() if count}


async def test_metrics_count_a_batch_once_with_the_status_its_caller_got() -> None:
    failures = [StoreUnavailable("cannot write the log")]

    def commit() -> None:
        if failures:
            raise failures.pop()

    metrics = OperationMetrics()
    servicer = local_servicer(NamespacedStorage(), commit=commit, metrics=metrics)
    batch = pb.PipelineRequest(
        operations=[
            pb.Operation(set=pb.SetRequest(key="k", value=b"v")),
            pb.Operation(set=pb.SetRequest(key="k" * 5000, value=b"v")),  # refused alone: over a limit
            pb.Operation(get=pb.GetRequest(key="k")),
        ]
    )
    with pytest.raises(StoreUnavailable):
        await servicer.run_batch(batch)  # the stream fails: every operation of the batch failed with it
    assert counted(metrics) == {("set", "UNAVAILABLE"): 2, ("get", "UNAVAILABLE"): 1}
    await servicer.run_batch(batch)  # the client sends it again
    assert counted(metrics) == {
        ("set", "UNAVAILABLE"): 2,
        ("get", "UNAVAILABLE"): 1,
        ("set", "OK"): 1,
        ("set", "INVALID_ARGUMENT"): 1,
        ("get", "OK"): 1,
    }
    assert metrics.durations["set"].counts[-1] == 0  # no operation took a second
