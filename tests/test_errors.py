"""Errors every language can act on: each failed call carries a google.rpc.Status (gRPC's richer
error model) whose ErrorInfo gives a reason from store.proto's one list and whether the call was
applied, with the detail its reason calls for; an operation of a Pipeline carries the same in its
OperationError; GrpcStore's StoreError.reason and .applied come from those fields.

A real server process, called through the generated stubs as any language would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from nestkv.client import GrpcStore, PreconditionFailedError, StoreFullError
from nestkv.server.errors import FAULTS
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import peer_pb2_grpc, store_pb2_grpc
from nestkv.v1 import store_pb2 as pb
from tests.errorfields import detail_of, fields_of, info_of
from tests.pki import AuthFile
from tests.serverproc import ServerProcess

CLIENT_REASONS = {"CONNECTION_LOST", "STORE_CLOSED"}
"""Reasons a client reports of its own connection, never sent by a server (store.proto says so)."""
QUOTA = 64 * 1024


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuthFile, dict[str, str]]:
    auth_file = AuthFile(tmp_path_factory.mktemp("errors") / "tokens.toml")
    minted = {
        "writer": auth_file.mint("writer", ["w"]),
        "reader": auth_file.mint("reader", ["w"], access="read"),
        "quoted": auth_file.mint("quoted", ["q"], max_bytes=QUOTA),
    }
    return auth_file, minted


@pytest.fixture(scope="module")
def guarded(tokens: tuple[AuthFile, dict[str, str]]) -> Iterator[ServerProcess]:
    """A server with tokens and a small memory bound."""
    with ServerProcess("--auth-file", str(tokens[0].path), "--max-memory", "2M") as server:
        yield server


@pytest.fixture
async def channel(guarded: ServerProcess) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(guarded.target) as channel:
        yield channel


@pytest.fixture
def stub(channel: Any) -> Any:
    return store_pb2_grpc.StoreServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def refused(call: Any, request: Any, token: str | None) -> tuple[grpc.aio.AioRpcError, Any]:
    """The error of a call that must fail, and its google.rpc.Status."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, metadata=bearer(token) if token else None)
    status = rpc_status.from_call(caught.value)
    assert status is not None, "no google.rpc.Status in grpc-status-details-bin"
    assert (status.code, status.message) == (caught.value.code().value[0], caught.value.details())
    return caught.value, status


async def first_refusal(send: Callable[[int], Awaitable[Any]], limit: int = 100) -> Exception:
    """The error of the first of `send(0)`, `send(1)`, ... that fails."""
    for n in range(limit):
        try:
            await send(n)
        except Exception as error:
            return error
    raise AssertionError(f"{limit} writes and no refusal")


def described(status: status_pb2.Status) -> tuple[str, str, str]:
    """An ErrorInfo's reason, domain and applied."""
    info = info_of(status.details)
    return info.reason, info.domain, info.metadata["applied"]


def test_the_reasons_of_the_table_and_the_client_are_the_proto_s_list() -> None:
    names = pb.ErrorReason.keys()
    listed = {name.removeprefix("ERROR_REASON_") for name in names} - {"UNSPECIFIED"}
    from_server = {meaning.reason for meaning in FAULTS.values()}
    assert from_server | CLIENT_REASONS == listed
    assert not from_server & CLIENT_REASONS


async def test_a_field_over_its_limit_names_the_field_and_the_limit(
    stub: Any, tokens: tuple[AuthFile, dict[str, str]]
) -> None:
    error, status = await refused(stub.Set, pb.SetRequest(key="k" * 5000), tokens[1]["writer"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert described(status) == ("INVALID_FIELD", "nestkv", "NOT_APPLIED")
    assert info_of(status.details).metadata["limit"] == "4096"
    [violation] = detail_of(status.details, error_details_pb2.BadRequest).field_violations
    assert (violation.field, violation.description) == ("key", error.details())
    _, status = await refused(stub.Set, pb.SetRequest(path=["a", ""], key="k"), tokens[1]["writer"])
    assert detail_of(status.details, error_details_pb2.BadRequest).field_violations[0].field == "path"
    expiry = pb.SetRequest(key="k", expires_in={"seconds": -1})
    _, status = await refused(stub.Set, expiry, tokens[1]["writer"])
    assert detail_of(status.details, error_details_pb2.BadRequest).field_violations[0].field == "expires_in"


async def test_an_increment_the_value_does_not_allow_is_a_precondition_failure(
    stub: Any, tokens: tuple[AuthFile, dict[str, str]]
) -> None:
    writer = bearer(tokens[1]["writer"])
    await stub.Set(pb.SetRequest(key="text", value=b"abc"), metadata=writer)
    await stub.Set(pb.SetRequest(key="big", value=b"%d" % (2**63 - 1)), metadata=writer)
    for key, reason in (("text", "NOT_AN_INTEGER"), ("big", "INTEGER_OVERFLOW")):
        error, status = await refused(
            stub.Increment, pb.IncrementRequest(key=key, amount=1), tokens[1]["writer"]
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert described(status) == (reason, "nestkv", "NOT_APPLIED")
        [violation] = detail_of(status.details, error_details_pb2.PreconditionFailure).violations
        assert (violation.type, violation.subject) == (reason, "value")


async def test_tokens_missing_unknown_and_read_only_each_have_their_reason(
    stub: Any, channel: Any, tokens: tuple[AuthFile, dict[str, str]]
) -> None:
    request = pb.SetRequest(key="k", value=b"v")
    for token, code, reason in (
        (None, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        ("not-a-token-this-server-holds", grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
        (tokens[1]["reader"], grpc.StatusCode.PERMISSION_DENIED, "ACCESS_DENIED"),
    ):
        error, status = await refused(stub.Set, request, token)
        assert (error.code(), described(status)) == (code, (reason, "nestkv", "NOT_APPLIED"))
    # A token is no use to PeerService, nor is a peer header without being a member (a single
    # server has none): admission is per service.
    peer_stub = peer_pb2_grpc.PeerServiceStub(channel)
    for metadata in (bearer(tokens[1]["writer"]), (("nestkv-peer", "node-0"),)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await peer_stub.Ping(peer_pb.PingRequest(), metadata=metadata)
        status = rpc_status.from_call(caught.value)
        assert (caught.value.code(), described(status)[0]) == (grpc.StatusCode.UNAUTHENTICATED, "NODES_ONLY")


async def test_a_quota_reached_is_a_quota_failure_and_the_pipeline_says_the_same(
    stub: Any, tokens: tuple[AuthFile, dict[str, str]]
) -> None:
    quoted = bearer(tokens[1]["quoted"])
    big = b"x" * (QUOTA // 4)
    refusal = await first_refusal(lambda n: stub.Set(pb.SetRequest(key=f"k{n}", value=big), metadata=quoted))
    assert isinstance(refusal, grpc.aio.AioRpcError)
    status = rpc_status.from_call(refusal)
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert described(status) == ("QUOTA_EXCEEDED", "nestkv", "NOT_APPLIED")
    [violation] = detail_of(status.details, error_details_pb2.QuotaFailure).violations
    assert violation.subject == "namespace quota"
    # The same write in a Pipeline: its OperationError carries what the call's status did.
    call = stub.Pipeline(metadata=quoted)
    await call.write(
        pb.PipelineRequest(id=1, operations=[pb.Operation(set=pb.SetRequest(key="k9", value=big))])
    )
    response = await call.read()
    await call.done_writing()
    error = response.results[0].error
    assert fields_of(error) == ("RESOURCE_EXHAUSTED", "ERROR_REASON_QUOTA_EXCEEDED", "APPLIED_NOT_APPLIED")
    assert (error.message, list(error.details)) == (status.message, list(status.details))


async def test_the_store_full_says_so_and_may_not_be_retried_as_is(
    stub: Any, tokens: tuple[AuthFile, dict[str, str]]
) -> None:
    writer = bearer(tokens[1]["writer"])
    value = b"y" * 100_000
    refusal = await first_refusal(
        lambda n: stub.Set(pb.SetRequest(path=["full"], key=f"k{n}", value=value), metadata=writer)
    )
    status = rpc_status.from_call(refusal)
    assert described(status) == ("STORE_FULL", "nestkv", "NOT_APPLIED")
    assert detail_of(status.details, error_details_pb2.QuotaFailure).violations[0].subject == "max_memory"
    with pytest.raises(AssertionError, match="RetryInfo"):  # retrying the same write does not help
        detail_of(status.details, error_details_pb2.RetryInfo)
    await stub.DeleteAll(pb.DeleteAllRequest(path=["full"]), metadata=writer)


async def test_grpc_store_errors_carry_the_reason_and_applied_of_the_fields(
    guarded: ServerProcess, tokens: tuple[AuthFile, dict[str, str]]
) -> None:
    async with GrpcStore.with_client(guarded.target, token=tokens[1]["writer"]) as store:
        await store.set("word", "not a number")
        with pytest.raises(PreconditionFailedError) as caught:
            await store.increment("word")
        assert (caught.value.reason, caught.value.applied) == ("NOT_AN_INTEGER", False)
    async with GrpcStore.with_client(guarded.target, token=tokens[1]["quoted"]) as store:
        full = await first_refusal(lambda n: store.set(f"g{n}", b"z" * (QUOTA // 4)))
        assert isinstance(full, StoreFullError)
        assert (full.reason, full.applied) == ("QUOTA_EXCEEDED", False)
