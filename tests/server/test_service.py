"""Requests over the wire, straight from a raw stub: what a client in any language can send."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nestkv.client import channel_options
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.serverproc import ServerProcess

INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def small_server() -> Any:
    """A server with small limits, so that over-limit requests are cheap to send."""
    with ServerProcess(
        "--max-key-bytes", "16", "--max-value-bytes", "1024", "--max-depth", "3", "--max-segment-bytes", "8"
    ) as process:
        yield process


@pytest.fixture
async def channel(small_server: ServerProcess) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(small_server.target, options=channel_options()) as channel:
        yield channel


@pytest.fixture
async def stub(channel: Any) -> Any:
    stub = store_pb2_grpc.StoreServiceStub(channel)
    await stub.DeleteAll(pb.DeleteAllRequest())
    await stub.Set(pb.SetRequest(path=["ns"], key="key", value=b"kept", expires_in=Duration(seconds=100)))
    return stub


async def assert_untouched_and_serving(stub: Any) -> None:
    response = await stub.Get(pb.GetRequest(path=["ns"], key="key"))
    assert (response.found, response.value) == (True, b"kept")
    left = await stub.ExpiresIn(pb.ExpiresInRequest(path=["ns"], key="key"))
    assert 99 < left.expires_in.ToTimedelta().total_seconds() <= 100


async def expect_invalid(call: Any, request: Any, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            pb.SetRequest(path=["ns"], key="k" * 17, value=b"new"),
            "key is 17 bytes; the limit is 16 (max_key_bytes)",
        ),
        (
            pb.SetRequest(path=["ns"], key="key", value=b"x" * 1025),
            "value is 1025 bytes; the limit is 1024 (max_value_bytes)",
        ),
        (
            pb.SetRequest(path=["a", "b", "c", "d"], key="k"),
            "path has 4 segments; the limit is 3 (max_depth)",
        ),
        (
            pb.SetRequest(path=["ns", "é" * 5], key="k"),
            "namespace segment is 10 bytes; the limit is 8 (max_segment_bytes)",
        ),
        (pb.SetRequest(path=["ns", ""], key="k"), "namespace segment is empty"),
        (
            pb.SetRequest(path=["ns"], key="key", expires_in=Duration(seconds=-1)),
            "expires_in must be positive",
        ),
        (pb.SetRequest(path=["ns"], key="key", expires_in=Duration()), "expires_in must be positive"),
        (
            pb.SetRequest(path=["ns"], key="key", expires_in=Duration(seconds=INT64_MAX)),
            "the limit is 315576000000 s",
        ),
        (
            pb.SetRequest(path=["ns"], key="key", expires_in=Duration(seconds=1, nanos=-5)),
            "expires_in is not a valid Duration",
        ),
        (
            pb.SetRequest(path=["ns"], key="key", expires_in=Duration(nanos=2_000_000_000)),
            "expires_in is not a valid Duration",
        ),
    ],
)
async def test_bad_set_is_rejected_and_data_untouched(stub: Any, request_: Any, message: str) -> None:
    await expect_invalid(stub.Set, request_, message)
    await assert_untouched_and_serving(stub)


@pytest.mark.parametrize(
    ("call", "request_", "message"),
    [
        (
            "Get",
            pb.GetRequest(path=["ns"], key="key", renew_for=Duration(seconds=-3)),
            "renew_for must be positive",
        ),
        ("Get", pb.GetRequest(path=["ns"], key="key", renew_for=Duration(seconds=INT64_MAX)), "the limit is"),
        ("Get", pb.GetRequest(path=["ns"], key="k" * 17), "max_key_bytes"),
        ("Delete", pb.DeleteRequest(path=["ns"], key="k" * 17), "max_key_bytes"),
        ("Delete", pb.DeleteRequest(path=[""], key="key"), "namespace segment is empty"),
        ("DeleteAll", pb.DeleteAllRequest(path=["ns", ""]), "namespace segment is empty"),
        ("DeleteAll", pb.DeleteAllRequest(path=["a"] * 4), "max_depth"),
        ("Exists", pb.ExistsRequest(path=["x" * 9], key="key"), "max_segment_bytes"),
        ("ExpiresIn", pb.ExpiresInRequest(path=["ns"], key="k" * 17), "max_key_bytes"),
        ("Increment", pb.IncrementRequest(path=["ns"], key="k" * 17, amount=1), "max_key_bytes"),
        ("Increment", pb.IncrementRequest(path=["a"] * 4, key="key", amount=1), "max_depth"),
        (
            "Increment",
            pb.IncrementRequest(path=["ns"], key="key", expires_in=Duration(seconds=0)),
            "expires_in must be positive",
        ),
        (
            "Set",
            pb.SetRequest(path=["ns"], key="key", condition=pb.SET_CONDITION_IF_VERSION),
            "if_version is given if and only if condition is SET_CONDITION_IF_VERSION",
        ),
        (
            "Set",
            pb.SetRequest(path=["ns"], key="key", condition=pb.SET_CONDITION_IF_VERSION, if_version=b"x"),
            "if_version is 1 bytes; a version is 16",
        ),
        (
            "Set",
            pb.SetRequest(path=["ns"], key="key", condition=7),  # type: ignore[arg-type]
            "condition is 7, not a SetCondition",
        ),
        ("Delete", pb.DeleteRequest(path=["ns"], key="key", if_version=b"short"), "if_version is 5 bytes"),
    ],
)
async def test_bad_request_to_each_rpc_is_rejected(stub: Any, call: str, request_: Any, message: str) -> None:
    await expect_invalid(getattr(stub, call), request_, message)
    await assert_untouched_and_serving(stub)


async def test_requests_at_the_limits_are_accepted(stub: Any) -> None:
    request = pb.SetRequest(path=["é" * 4, "b", "c"], key="k" * 16, value=b"x" * 1024)
    await stub.Set(request)
    response = await stub.Get(pb.GetRequest(path=request.path, key=request.key))
    assert response.value == b"x" * 1024


async def test_expires_in_response_tells_the_three_cases_apart(stub: Any) -> None:
    await stub.Set(pb.SetRequest(path=["ns"], key="forever", value=b"v"))
    await stub.Set(
        pb.SetRequest(path=["ns"], key="ttl", value=b"v", expires_in=Duration(seconds=5, nanos=500_000_000))
    )
    missing = await stub.ExpiresIn(pb.ExpiresInRequest(path=["ns"], key="missing"))
    forever = await stub.ExpiresIn(pb.ExpiresInRequest(path=["ns"], key="forever"))
    ttl = await stub.ExpiresIn(pb.ExpiresInRequest(path=["ns"], key="ttl"))
    assert (missing.found, missing.HasField("expires_in")) == (False, False)
    assert (forever.found, forever.HasField("expires_in")) == (True, False)
    assert ttl.found
    assert 5.4 < ttl.expires_in.ToTimedelta().total_seconds() <= 5.5  # millisecond precision on the wire


@pytest.mark.parametrize("method", ["Set", "Get", "Delete", "DeleteAll", "Exists", "ExpiresIn"])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x0a\xff\x01abc"])
async def test_malformed_bytes_get_an_error_status(
    stub: Any, channel: Any, method: str, payload: bytes
) -> None:
    # \x0a\x02\xc3\x28: a path segment of invalid UTF-8; the others are truncated messages.
    raw = channel.unary_unary(f"/nestkv.v1.StoreService/{method}")
    await expect_invalid(raw, payload, "malformed nestkv.v1.")
    await assert_untouched_and_serving(stub)


async def test_health_reports_serving(channel: Any) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nestkv.v1.StoreService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel: Any) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for response in responses:
        names |= {service.name for service in response.list_services_response.service}
    assert {"nestkv.v1.StoreService", "nestkv.v1.PeerService", "grpc.health.v1.Health"} <= names


def test_store_service_holds_only_what_clients_call() -> None:
    """What only nodes call is PeerService's, in peer.proto: a client generated from store.proto
    has no call it must never make."""
    store = {method.name for method in pb.DESCRIPTOR.services_by_name["StoreService"].methods}
    peer = {method.name for method in peer_pb.DESCRIPTOR.services_by_name["PeerService"].methods}
    assert not store & {"HandOff", "Ping", "CatchUp"}
    assert peer == {"Pipeline", "Stats", "Topology", "HandOff", "Ping", "CatchUp"}


async def test_pipeline_answers_a_mixed_batch_in_order_with_errors_in_place(stub: Any) -> None:
    operations = [
        pb.Operation(set=pb.SetRequest(path=["p"], key="a", value=b"1", expires_in=Duration(seconds=30))),
        pb.Operation(get=pb.GetRequest(path=["p"], key="a")),
        pb.Operation(set=pb.SetRequest(path=["p"], key="k" * 17, value=b"too long a key")),
        pb.Operation(),
        pb.Operation(exists=pb.ExistsRequest(path=["p"], key="a")),
        pb.Operation(expires_in=pb.ExpiresInRequest(path=["p"], key="a")),
        pb.Operation(delete_all=pb.DeleteAllRequest(path=["p"])),
        pb.Operation(get=pb.GetRequest(path=["p"], key="a")),
        pb.Operation(delete=pb.DeleteRequest(path=["ns"], key="missing")),
    ]
    call = stub.Pipeline()
    await call.write(pb.PipelineRequest(id=7, operations=operations))
    response = await call.read()
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert response.id == 7
    kinds = [result.WhichOneof("result") for result in response.results]
    assert kinds == ["set", "get", "error", "error", "exists", "expires_in", "delete_all", "get", "delete"]
    results = response.results
    assert (results[1].get.found, results[1].get.value) == (True, b"1")
    assert results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "the limit is 16 (max_key_bytes)" in results[2].error.message
    assert "operation is empty" in results[3].error.message
    assert results[4].exists.exists
    assert 29 < results[5].expires_in.expires_in.ToTimedelta().total_seconds() <= 30
    assert not results[7].get.found  # applied in order: after the delete_all
    await assert_untouched_and_serving(stub)


async def test_pipeline_batches_on_one_stream_are_answered_in_turn(stub: Any) -> None:
    call = stub.Pipeline()
    for n in range(1, 4):
        await call.write(pb.PipelineRequest(id=n, operations=[pb.Operation(set=pb.SetRequest(key=f"k{n}"))]))
    ids = [(await call.read()).id for _ in range(3)]
    assert ids == [1, 2, 3]
    call.cancel()


async def test_malformed_bytes_on_the_pipeline_end_the_stream_only(stub: Any, channel: Any) -> None:
    call = channel.stream_stream("/nestkv.v1.StoreService/Pipeline")()
    await call.write(b"\x12\xff\x01abc")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed nestkv.v1.PipelineRequest" in caught.value.details()
    await assert_untouched_and_serving(stub)


async def test_get_with_version_returns_the_version_and_the_time_left(stub: Any) -> None:
    await stub.Set(pb.SetRequest(path=["ns"], key="versioned", value=b"v1", expires_in=Duration(seconds=100)))
    plain = await stub.Get(pb.GetRequest(path=["ns"], key="versioned"))
    assert (plain.version, plain.HasField("expires_in")) == (b"", False)  # only where asked
    first = await stub.Get(pb.GetRequest(path=["ns"], key="versioned", with_version=True))
    assert (first.found, first.value, len(first.version)) == (True, b"v1", 16)
    assert 99 < first.expires_in.ToTimedelta().total_seconds() <= 100
    renewed = await stub.Get(
        pb.GetRequest(path=["ns"], key="versioned", with_version=True, renew_for=Duration(seconds=500))
    )
    assert renewed.version > first.version  # a renewal is a change
    assert 499 < renewed.expires_in.ToTimedelta().total_seconds() <= 500
    await stub.Set(pb.SetRequest(path=["ns"], key="forever", value=b"v"))
    forever = await stub.Get(pb.GetRequest(path=["ns"], key="forever", with_version=True))
    assert forever.version > renewed.version
    assert not forever.HasField("expires_in")
    missing = await stub.Get(pb.GetRequest(path=["ns"], key="missing", with_version=True))
    assert (missing.found, missing.version) == (False, b"")


async def test_a_failed_increment_tells_the_client_not_to_retry_and_its_channel_would_not(stub: Any) -> None:
    await stub.Set(pb.SetRequest(key="text", value=b"abc"))
    call = stub.Increment(pb.IncrementRequest(key="text", amount=1))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("grpc-retry-pushback-ms", "-1") in tuple(await call.trailing_metadata())
    # The channel's own retry policy (channel_options) leaves Increment out: sent again, it counts twice.
    config = json.loads(dict(channel_options())["grpc.service_config"])
    retried = {name["method"] for entry in config["methodConfig"] for name in entry["name"]}
    assert "Set" in retried
    assert "Increment" not in retried


async def test_increment_over_the_unary_rpc_counts_and_keeps_the_first_expiry(stub: Any) -> None:
    first = await stub.Increment(pb.IncrementRequest(key="n", amount=5, expires_in=Duration(seconds=60)))
    second = await stub.Increment(pb.IncrementRequest(key="n", amount=-2, expires_in=Duration(seconds=5)))
    assert (first.value, second.value) == (5, 3)
    assert len(second.version) == 16
    assert second.version > first.version
    assert 55 <= second.expires_in.seconds <= 60
    got = await stub.Get(pb.GetRequest(key="n"))
    assert got.value == b"3"
