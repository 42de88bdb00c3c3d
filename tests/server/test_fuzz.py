"""Fuzzing the wire: random bytes and extreme requests to every RPC of a real server.

Each gets a result or an error status (never UNKNOWN or INTERNAL, the marks
of an unhandled fault), the server stays up, and data no valid request in the
input aimed at is intact. NESTKV_SOAK=1 (make soak) runs many more cases.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestkv.client import channel_options
from nestkv.v1 import store_pb2 as pb
from tests.serverproc import ServerProcess

SOAK = os.environ.get("NESTKV_SOAK") == "1"
FUZZ = settings(
    max_examples=3000 if SOAK else 150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SENTINEL_PATH = ("kept", "safe")
SENTINEL_KEY = "sentinel"
REQUESTS: dict[str, type[Message]] = {
    "Set": pb.SetRequest,
    "Get": pb.GetRequest,
    "Delete": pb.DeleteRequest,
    "DeleteAll": pb.DeleteAllRequest,
    "Exists": pb.ExistsRequest,
    "ExpiresIn": pb.ExpiresInRequest,
    "Pipeline": pb.PipelineRequest,
}
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


class Wire:
    """A raw channel to the fuzzed server, driven from synchronous hypothesis tests."""

    def __init__(self, target: str) -> None:
        self.runner = asyncio.Runner()
        self.channel = self.runner.run(self._open(target))
        self.answers: list[Any] = []  # the responses of the last Pipeline call

    @staticmethod
    async def _open(target: str) -> Any:
        return grpc.aio.insecure_channel(target, options=channel_options())

    def send(self, method: str, payload: bytes) -> grpc.StatusCode:
        return self.runner.run(self._send(method, payload))

    async def _send(self, method: str, payload: bytes) -> grpc.StatusCode:
        path = f"/nestkv.v1.StoreService/{method}"
        try:
            if method == "Pipeline":
                call = self.channel.stream_stream(path)()
                await call.write(payload)
                await call.done_writing()
                self.answers = [pb.PipelineResponse.FromString(answer) async for answer in call]
            else:
                await self.channel.unary_unary(path)(payload, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async def _unary(self, method: str, request: Message) -> bytes:
        call = self.channel.unary_unary(f"/nestkv.v1.StoreService/{method}")
        return await call(request.SerializeToString())  # type: ignore[no-any-return]

    def sentinel(self) -> bytes | None:
        response = self.runner.run(self._unary("Get", pb.GetRequest(path=SENTINEL_PATH, key=SENTINEL_KEY)))
        found = pb.GetResponse.FromString(response)
        return found.value if found.found else None

    def put_sentinel(self) -> None:
        self.runner.run(
            self._unary("Set", pb.SetRequest(path=SENTINEL_PATH, key=SENTINEL_KEY, value=b"intact"))
        )

    def close(self) -> None:
        self.runner.run(self.channel.close())
        self.runner.close()


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    limits = (
        "--max-key-bytes",
        "64",
        "--max-value-bytes",
        "4096",
        "--max-depth",
        "4",
        "--max-segment-bytes",
        "16",
    )
    with ServerProcess(*limits) as server:
        connection = Wire(server.target)
        connection.put_sentinel()
        yield connection
        connection.close()
        assert server.process.poll() is None  # still serving after everything


def aims_at_sentinel(method: str, payload: bytes) -> bool:
    """Whether `payload` parses as a request that may change the sentinel (the oracle's one exception)."""
    try:
        request = REQUESTS[method].FromString(payload)
    except DecodeError:
        return False
    if isinstance(request, pb.PipelineRequest):
        kinds = [operation.WhichOneof("operation") for operation in request.operations]
        inner = [getattr(op, kind) for op, kind in zip(request.operations, kinds, strict=True) if kind]
        return any(aims(item) for item in inner)
    return aims(request)


def aims(request: Any) -> bool:
    path = tuple(request.path)
    if isinstance(request, pb.DeleteAllRequest):
        return SENTINEL_PATH[: len(path)] == path
    if isinstance(request, pb.SetRequest | pb.DeleteRequest):
        return path == SENTINEL_PATH and request.key == SENTINEL_KEY
    return False


def check(wire: Wire, method: str, payload: bytes) -> None:
    wire.answers = []
    code = wire.send(method, payload)
    assert code in ANSWERS
    if method == "Pipeline" and code == grpc.StatusCode.OK:
        # Exactly one result per operation, in order, each of its operation's kind or an error.
        request = pb.PipelineRequest.FromString(payload)
        results = [result for answer in wire.answers for result in answer.results]
        assert {answer.id for answer in wire.answers} <= {request.id}
        assert len(results) == len(request.operations)
        for operation, result in zip(request.operations, results, strict=True):
            assert result.WhichOneof("result") in {operation.WhichOneof("operation"), "error"}
    if aims_at_sentinel(method, payload):
        wire.put_sentinel()
    assert wire.sentinel() == b"intact"


@FUZZ
@given(method=st.sampled_from(sorted(REQUESTS)), payload=st.binary(max_size=512))
def test_random_bytes_get_an_answer_and_harm_nothing(wire: Wire, method: str, payload: bytes) -> None:
    check(wire, method, payload)


def varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


@FUZZ
@given(
    field=st.sampled_from([1, 2]),  # path segment or key of a SetRequest
    data=st.binary(max_size=80),
    method=st.sampled_from(["Set", "Get", "Exists"]),
)
def test_invalid_utf8_in_strings_is_rejected(wire: Wire, field: int, data: bytes, method: str) -> None:
    check(wire, method, bytes([field << 3 | 2]) + varint(len(data)) + data)


texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=100)
extreme_durations = st.builds(
    Duration, seconds=st.integers(-(2**63), 2**63 - 1), nanos=st.integers(-(2**31), 2**31 - 1)
)
extreme_paths = st.lists(st.one_of(texts, st.just(""), st.text(min_size=15, max_size=40)), max_size=8)
extreme_keys = st.one_of(texts, st.text(min_size=60, max_size=200))
extreme_values = st.one_of(st.binary(max_size=64), st.binary(min_size=4090, max_size=4200))
requests = st.one_of(
    st.builds(
        pb.SetRequest,
        path=extreme_paths,
        key=extreme_keys,
        value=extreme_values,
        expires_in=extreme_durations,
    ),
    st.builds(pb.SetRequest, path=extreme_paths, key=extreme_keys, value=extreme_values),
    st.builds(pb.GetRequest, path=extreme_paths, key=extreme_keys, renew_for=extreme_durations),
    st.builds(pb.DeleteRequest, path=extreme_paths, key=extreme_keys),
    st.builds(pb.DeleteAllRequest, path=extreme_paths),
    st.builds(pb.ExistsRequest, path=extreme_paths, key=extreme_keys),
    st.builds(pb.ExpiresInRequest, path=extreme_paths, key=extreme_keys),
)
METHOD_OF = {request: method for method, request in REQUESTS.items()}
KIND_OF = {pb.SetRequest: "set", pb.GetRequest: "get", pb.DeleteRequest: "delete"}
KIND_OF |= {pb.DeleteAllRequest: "delete_all", pb.ExistsRequest: "exists", pb.ExpiresInRequest: "expires_in"}


@FUZZ
@given(request=requests)
def test_extreme_valid_requests_get_an_answer(wire: Wire, request: Any) -> None:
    check(wire, METHOD_OF[type(request)], request.SerializeToString())


@FUZZ
@given(batch=st.lists(requests, max_size=20))
def test_extreme_batches_get_an_answer_for_each_operation(wire: Wire, batch: list[Any]) -> None:
    operations = [pb.Operation(**{KIND_OF[type(request)]: request}) for request in batch]
    payload = pb.PipelineRequest(id=2**64 - 1, operations=operations).SerializeToString()
    check(wire, "Pipeline", payload)
