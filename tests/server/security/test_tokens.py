"""Tokens confined to a namespace (issue 10), against a real server with TLS and an --auth-file.

One server for the module, with three tokens: "a-rw" (rooted at ["a"], readwrite), "a-read" (["a"],
read) and "root-rw" ([], readwrite: the tests' admin, which plants data and looks at what changed).
Tokens to revoke are minted per test. Every operation is sent from raw stubs, so that any path can be
sent, once as one-operation RPCs and once inside Pipeline batches; GrpcStore is checked on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from nestkv.client import AuthenticationError, GrpcStore, PermissionDeniedError
from nestkv.server.limits import Limits
from nestkv.server.security import new_token
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.pki import AuthFile, Pki
from tests.polling import eventually
from tests.serverproc import ServerProcess

Path = tuple[str, ...]
Metadata = tuple[tuple[str, str], ...]

MAX_DEPTH = Limits().max_depth
MAX_SEGMENT_BYTES = Limits().max_segment_bytes
OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_RPC_OF_KIND = {
    "set": "Set",
    "get": "Get",
    "delete": "Delete",
    "delete_all": "DeleteAll",
    "exists": "Exists",
    "expires_in": "ExpiresIn",
}
_TOKEN_LIKE = re.compile(r"nkv_[A-Za-z0-9_-]{16,}")
_METRICS_AT = re.compile(r"metrics at (http://\S+/metrics)")
WRONG_TOKEN = new_token()
"""Well formed, but in no auth file."""

DECOY_TTL = 1000
"""Seconds to live of the keys planted outside the caller's reach: a renewal would lift it."""


# --- the server -------------------------------------------------------------------------------------


@dataclass
class Served:
    process: ServerProcess
    auth_file: AuthFile
    credentials: grpc.ChannelCredentials
    tokens: dict[str, str]
    """Token by name."""
    sent: list[str] = field(default_factory=list)
    """Every token string sent to the server, valid or not: none may appear in its log or metrics."""

    @property
    def target(self) -> str:
        return self.process.target

    def lines(self, text: str) -> int:
        return sum(text in line for line in self.process.log)

    async def reload(self, *, kept: bool = False) -> None:
        """SIGHUP, then wait for the log line of the reload: `auth file PATH reloaded: N tokens`, or
        with `kept`, of a reload that failed: `kept the previous tokens: ...`."""
        line = "kept the previous tokens: " if kept else f"auth file {self.auth_file.path} reloaded: "
        before = self.lines(line)
        self.process.process.send_signal(signal.SIGHUP)
        await eventually(lambda: self.lines(line) > before, within=15)

    def scrape(self) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """The /metrics page: its text, and its samples by name and labels."""
        url = next(match[1] for line in self.process.log if (match := _METRICS_AT.search(line)))
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        return text, samples


@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    auth_file = AuthFile(tmp_path_factory.mktemp("tokens") / "tokens.toml")
    tokens = {
        "a-rw": auth_file.mint("a-rw", ["a"], "readwrite"),
        "a-read": auth_file.mint("a-read", ["a"], "read"),
        "root-rw": auth_file.mint("root-rw", [], "readwrite"),
    }
    tls = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    args = (*tls, "--auth-file", str(auth_file.path), "--metrics-port", "0")
    with ServerProcess(*args) as process:
        yield Served(process, auth_file, pki.credentials(), tokens, [*tokens.values(), WRONG_TOKEN])


# --- operations, and two ways to send them ----------------------------------------------------------


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def op_set(path: Path, key: str, value: bytes, ttl: int | None = None) -> pb.Operation:
    request = pb.SetRequest(path=path, key=key, value=value)
    if ttl is not None:
        request.expires_in.CopyFrom(Duration(seconds=ttl))
    return pb.Operation(set=request)


def op_get(path: Path, key: str, renew_for: int | None = None) -> pb.Operation:
    request = pb.GetRequest(path=path, key=key)
    if renew_for is not None:
        request.renew_for.CopyFrom(Duration(seconds=renew_for))
    return pb.Operation(get=request)


def op_delete(path: Path, key: str) -> pb.Operation:
    return pb.Operation(delete=pb.DeleteRequest(path=path, key=key))


def op_delete_all(path: Path) -> pb.Operation:
    return pb.Operation(delete_all=pb.DeleteAllRequest(path=path))


def op_exists(path: Path, key: str) -> pb.Operation:
    return pb.Operation(exists=pb.ExistsRequest(path=path, key=key))


def op_expires_in(path: Path, key: str) -> pb.Operation:
    return pb.Operation(expires_in=pb.ExpiresInRequest(path=path, key=key))


def every_kind(path: Path) -> list[pb.Operation]:
    """One operation of each kind on `path`, the renewing get included."""
    return [
        op_set(path, "k", b"written"),
        op_get(path, "k"),
        op_get(path, "k", renew_for=5000),
        op_delete(path, "k"),
        op_delete_all(path),
        op_exists(path, "k"),
        op_expires_in(path, "k"),
    ]


def code(result: pb.OperationResult) -> grpc.StatusCode:
    if result.WhichOneof("result") != "error":
        return OK
    return _CODE_OF_NUMBER[result.error.code]


def codes(results: Sequence[pb.OperationResult]) -> list[grpc.StatusCode]:
    return [code(result) for result in results]


def value(result: pb.OperationResult) -> bytes | None:
    assert result.WhichOneof("result") == "get", result
    return result.get.value if result.get.found else None


def exists(result: pb.OperationResult) -> bool:
    assert result.WhichOneof("result") == "exists", result
    return result.exists.exists


def seconds_left(result: pb.OperationResult) -> float | None:
    """Seconds to live from an expires_in result; None: no such key; inf: no expiry."""
    assert result.WhichOneof("result") == "expires_in", result
    if not result.expires_in.found:
        return None
    if not result.expires_in.HasField("expires_in"):
        return float("inf")
    return result.expires_in.expires_in.ToTimedelta().total_seconds()


class Caller(Protocol):
    async def run(self, *operations: pb.Operation) -> list[pb.OperationResult]: ...

    async def stats(self, path: Path) -> pb.StatsResponse: ...


class Unary:
    """Sends each operation as its one-operation RPC; a failed call's status becomes its OperationError."""

    def __init__(self, stub: Any, metadata: Metadata) -> None:
        self.stub = stub
        self.metadata = metadata

    async def run(self, *operations: pb.Operation) -> list[pb.OperationResult]:
        results = []
        for operation in operations:
            kind = operation.WhichOneof("operation")
            assert kind is not None
            result = pb.OperationResult()
            try:
                response = await getattr(self.stub, _RPC_OF_KIND[kind])(
                    getattr(operation, kind), metadata=self.metadata
                )
            except grpc.aio.AioRpcError as error:
                result.error.code = error.code().value[0]
                result.error.message = error.details() or ""
            else:
                getattr(result, kind).CopyFrom(response)
            results.append(result)
        return results

    async def stats(self, path: Path) -> pb.StatsResponse:
        response: pb.StatsResponse = await self.stub.Stats(pb.StatsRequest(path=path), metadata=self.metadata)
        return response

    async def must(self, *operations: pb.Operation) -> list[pb.OperationResult]:
        """run, asserting that every operation succeeded."""
        results = await self.run(*operations)
        assert codes(results) == [OK] * len(operations), results
        return results


class Stream(Unary):
    """One Pipeline stream: each `run` is one batch on it. A failed stream raises its AioRpcError."""

    def __init__(self, stub: Any, metadata: Metadata) -> None:
        super().__init__(stub, metadata)
        self.call = stub.Pipeline(metadata=metadata)
        self.batches = 0

    async def run(self, *operations: pb.Operation) -> list[pb.OperationResult]:
        self.batches += 1
        # Writing to a stream that has ended raises InvalidStateError: reading raises its status.
        with contextlib.suppress(asyncio.InvalidStateError):
            await self.call.write(pb.PipelineRequest(id=self.batches, operations=operations))
        results: list[pb.OperationResult] = []
        while len(results) < len(operations):
            response = await self.call.read()
            assert response is not grpc.aio.EOF, "the server ended the stream"
            assert response.id == self.batches
            results.extend(response.results)
        assert len(results) == len(operations)
        return results


@pytest.fixture
async def channel(served: Served) -> AsyncIterator[Any]:
    async with grpc.aio.secure_channel(served.target, served.credentials) as channel:
        yield channel


@pytest.fixture
def stub(channel: Any) -> Any:
    return store_pb2_grpc.StoreServiceStub(channel)


@pytest.fixture
async def admin(served: Served, stub: Any) -> Unary:
    """root-rw over one-operation RPCs, on an emptied store."""
    admin = Unary(stub, bearer(served.tokens["root-rw"]))
    await admin.must(op_delete_all(()))
    return admin


@pytest.fixture(params=["unary", "pipeline"])
def connect(request: pytest.FixtureRequest, stub: Any) -> Iterator[Callable[[Metadata], Caller]]:
    """Callers sending with the given metadata: one-operation RPCs, or one Pipeline stream each."""
    streams: list[Stream] = []

    def connect(metadata: Metadata) -> Caller:
        if request.param == "unary":
            return Unary(stub, metadata)
        stream = Stream(stub, metadata)
        streams.append(stream)
        return stream

    yield connect
    for stream in streams:
        stream.call.cancel()


async def assert_holds(admin: Unary, expected: dict[tuple[Path, str], bytes]) -> None:
    """root-rw sees exactly `expected`: the key count of the store and of ["a"], and every value.

    Paths deeper than max_depth (a scoped token's root plus max_depth segments) are out of root-rw's
    reach: their keys are counted from the deepest namespace above them that it can ask about.
    """
    assert (await admin.stats(())).namespace.keys == len(expected)
    in_a = sum(path[:1] == ("a",) for path, _ in expected)
    assert (await admin.stats(("a",))).namespace.keys == in_a
    reachable = [entry for entry in expected if len(entry[0]) <= MAX_DEPTH]
    results = await admin.must(*(op_get(path, key) for path, key in reachable))
    assert {entry: value(result) for entry, result in zip(reachable, results, strict=True)} == {
        entry: expected[entry] for entry in reachable
    }
    for deepest in {path[:MAX_DEPTH] for path, _ in expected if len(path) > MAX_DEPTH}:
        below = sum(path[:MAX_DEPTH] == deepest for path, _ in expected)
        assert (await admin.stats(deepest)).namespace.keys == below


async def assert_not_renewed(admin: Unary, paths: Sequence[Path], key: str = "k") -> None:
    """The keys planted with DECOY_TTL still have no more than that to live."""
    results = await admin.must(*(op_expires_in(path, key) for path in paths))
    for path, result in zip(paths, results, strict=True):
        left = seconds_left(result)
        assert left is not None, path
        assert DECOY_TTL - 60 < left <= DECOY_TTL, path


def assert_confined(stats: pb.StatsResponse) -> None:
    """The server-wide figures of a scoped token's Stats are zeroes: they would describe other tenants."""
    server = stats.server
    assert (server.keys, server.memory_bytes, server.max_memory_bytes) == (0, 0, 0)
    assert (server.evictions, server.expired_keys) == (0, 0)
    assert server.version


# --- 1. a token rooted at ["a"] reaches ["a"] and below, and nothing else --------------------------

PATHS: dict[str, Path] = {
    "root": (),
    "b": ("b",),
    "a-again": ("a",),  # ["a", "a"], not ["a"]
    "look-alike": ("ab",),
    "dot-dot": ("..", "b"),
    "slash": ("/b",),
    "umlaut": ("ä",),
    "combining-accent": ("a\u0301",),
    "fullwidth": ("\uff41",),
    "max-depth": ("b",) * MAX_DEPTH,  # the limits apply to the path sent: ["a"] + 32 segments
}
INVALID_PATHS: dict[str, Path] = {
    "empty-segment": ("",),
    "empty-inner-segment": ("b", ""),
    "empty-after-dot-dot": ("..", ""),
    "over-max-depth": ("b",) * (MAX_DEPTH + 1),
    "segment-over-max-bytes": ("b" * (MAX_SEGMENT_BYTES + 1),),
}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
async def test_a_token_rooted_at_a_reads_writes_and_deletes_only_under_a(
    served: Served, admin: Unary, stub: Any, connect: Callable[[Metadata], Caller], path: Path
) -> None:
    target = ("a", *path)
    # Decoys: where the path would land without the root, the root, ["b"], the look-alike ["ab"], ["a"].
    decoys = [decoy for decoy in dict.fromkeys([(), ("b",), ("ab",), ("a",), path]) if decoy != target]
    expected: dict[tuple[Path, str], bytes] = {}
    for decoy in decoys:
        expected[decoy, "k"] = b"decoy at " + repr(decoy).encode()
        expected[decoy, "decoy"] = b"only decoys hold this key"
    await admin.must(*(op_set(where, key, data, ttl=DECOY_TTL) for (where, key), data in expected.items()))
    if len(target) <= MAX_DEPTH:
        await admin.must(op_set(target, "k", b"target", ttl=3000))
    else:  # out of root-rw's reach: the a-token plants it, and assert_holds finds it under ["a"]
        await Unary(stub, bearer(served.tokens["a-rw"])).must(op_set(path, "k", b"target", ttl=3000))
    expected[target, "k"] = b"target"
    await assert_holds(admin, expected)

    a = connect(bearer(served.tokens["a-rw"]))
    reads = await a.run(
        op_get(path, "k"),
        op_get(path, "decoy"),
        op_exists(path, "k"),
        op_exists(path, "decoy"),
        op_expires_in(path, "k"),
        op_expires_in(path, "decoy"),
        op_get(path, "k", renew_for=5000),
        op_expires_in(path, "k"),
        op_get(path, "decoy", renew_for=5000),
    )
    assert codes(reads) == [OK] * 9, reads
    assert value(reads[0]) == b"target"
    assert value(reads[1]) is None
    assert exists(reads[2]) is True
    assert exists(reads[3]) is False
    left = seconds_left(reads[4])
    assert left is not None
    assert 2900 < left <= 3000
    assert seconds_left(reads[5]) is None
    assert value(reads[6]) == b"target"
    renewed = seconds_left(reads[7])
    assert renewed is not None
    assert 4900 < renewed <= 5000
    assert value(reads[8]) is None
    await assert_holds(admin, expected)
    await assert_not_renewed(admin, decoys)
    await assert_not_renewed(admin, decoys, "decoy")

    writes = await a.run(
        op_set(path, "k", b"changed"),
        op_set(path, "fresh", b"new"),
        op_delete(path, "decoy"),
        op_get(path, "k"),
    )
    assert codes(writes) == [OK] * 4, writes
    assert value(writes[3]) == b"changed"
    expected[target, "k"] = b"changed"
    expected[target, "fresh"] = b"new"
    await assert_holds(admin, expected)
    await assert_not_renewed(admin, decoys)

    stats = await a.stats(path)
    assert stats.namespace.keys == 2
    assert stats.namespace.bytes > 0
    assert_confined(stats)
    whole = await a.stats(())  # the a-token's root is ["a"]
    assert whole.namespace == (await admin.stats(("a",))).namespace
    assert_confined(whole)
    assert (await admin.stats(())).server.keys == len(expected)  # root-rw's Stats is not confined

    deletes = await a.run(
        op_delete(path, "k"),
        op_exists(path, "k"),
        op_exists(path, "fresh"),
        op_delete_all(path),
        op_exists(path, "fresh"),
    )
    assert codes(deletes) == [OK] * 5, deletes
    assert [exists(deletes[1]), exists(deletes[2]), exists(deletes[4])] == [False, True, False]
    del expected[target, "k"], expected[target, "fresh"]
    await assert_holds(admin, expected)
    await assert_not_renewed(admin, decoys)
    assert (await a.stats(path)).namespace.keys == 0


async def test_delete_all_and_stats_of_the_a_token_at_its_root_cover_a_and_only_a(
    served: Served, admin: Unary, connect: Callable[[Metadata], Caller]
) -> None:
    inside: list[Path] = [("a",), ("a", "x"), ("a", "x", "y"), ("a", "b")]
    outside: list[Path] = [(), ("b",), ("ab",), ("b", "a"), ("x", "a")]
    await admin.must(*(op_set(where, "k", b"v" * 10) for where in inside + outside))
    a = connect(bearer(served.tokens["a-rw"]))

    stats = await a.stats(())
    assert stats.namespace.keys == len(inside)
    assert stats.namespace.child_namespaces == 2  # ["a", "x"] and ["a", "b"]
    assert stats.namespace == (await admin.stats(("a",))).namespace
    assert_confined(stats)

    assert codes(await a.run(op_delete_all(()))) == [OK]
    assert (await admin.stats(())).namespace.keys == len(outside)
    assert (await admin.stats(("a",))).namespace.keys == 0
    found = await admin.must(*(op_get(where, "k") for where in outside))
    assert [value(result) for result in found] == [b"v" * 10] * len(outside)
    assert (await a.stats(())).namespace.keys == 0


@pytest.mark.parametrize("path", INVALID_PATHS.values(), ids=INVALID_PATHS.keys())
async def test_a_path_over_the_limits_or_with_an_empty_segment_is_invalid_argument(
    served: Served, admin: Unary, stub: Any, connect: Callable[[Metadata], Caller], path: Path
) -> None:
    await admin.must(op_set(("b",), "k", b"kept"), op_set(("a",), "k", b"kept"))
    for token, then in (("a-rw", OK), ("a-read", PERMISSION_DENIED), ("root-rw", OK)):
        caller = connect(bearer(served.tokens[token]))
        # The limits come before the access check: the read token's writes are invalid too. The
        # valid operation after them runs (the read token's is refused).
        results = await caller.run(*every_kind(path), op_set((), "fine", token.encode()))
        assert codes(results) == [INVALID_ARGUMENT] * 7 + [then], (token, results)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await caller.stats(path)
        assert raised.value.code() == INVALID_ARGUMENT
    expected = {
        (("b",), "k"): b"kept",
        (("a",), "k"): b"kept",
        (("a",), "fine"): b"a-rw",
        ((), "fine"): b"root-rw",
    }
    await assert_holds(admin, expected)


async def test_grpc_store_with_the_a_token_works_under_a(served: Served, admin: Unary) -> None:
    await admin.must(op_set(("b",), "k", b"b's"), op_set((), "k", b"root's"))
    async with GrpcStore.with_client(
        served.target, credentials=served.credentials, token=served.tokens["a-rw"]
    ) as store:
        assert await store.get("k") is None
        assert await store.with_namespace("b").get("k") is None
        await store.set("k", b"a's")
        await store.with_namespace("b").set("k", b"a/b's", expires_in=100)
        assert await store.with_namespace("b").expires_in("k") in (99, 100)
        stats = await store.stats()
        assert stats.namespace.keys == 2
        assert stats.server.keys == 0
        await assert_holds(
            admin,
            {
                (("b",), "k"): b"b's",
                ((), "k"): b"root's",
                (("a",), "k"): b"a's",
                (("a", "b"), "k"): b"a/b's",
            },
        )
        await store.delete_all()
        await assert_holds(admin, {(("b",), "k"): b"b's", ((), "k"): b"root's"})


# --- 2. a read token reads, and changes nothing -----------------------------------------------------


async def test_a_read_token_may_not_write_nor_renew_and_changes_nothing(
    served: Served, admin: Unary, connect: Callable[[Metadata], Caller]
) -> None:
    await admin.must(
        op_set(("a",), "k", b"v", ttl=DECOY_TTL),
        op_set(("a",), "other", b"w"),
        op_set(("a", "x"), "k", b"x's", ttl=DECOY_TTL),
        op_set(("b",), "k", b"b's"),
    )
    expected = {
        (("a",), "k"): b"v",
        (("a",), "other"): b"w",
        (("a", "x"), "k"): b"x's",
        (("b",), "k"): b"b's",
    }
    reader = connect(bearer(served.tokens["a-read"]))
    results = await reader.run(
        op_set((), "k", b"overwritten"),
        op_get((), "k"),
        op_delete((), "other"),
        op_exists((), "other"),
        op_delete_all(()),
        op_get((), "k", renew_for=5000),
        op_expires_in((), "k"),
        op_set(("x",), "new", b"n", ttl=10),
        op_get(("x",), "k"),
        op_delete(("x",), "missing"),  # refused even though there is nothing to delete
        op_get((), "missing", renew_for=5000),  # refused even though there is nothing to renew
        op_delete_all(("x",)),
        op_exists(("b",), "k"),  # ["a", "b"]: nothing there
        op_expires_in(("x",), "k"),
    )
    assert codes(results) == [
        PERMISSION_DENIED,
        OK,
        PERMISSION_DENIED,
        OK,
        PERMISSION_DENIED,
        PERMISSION_DENIED,
        OK,
        PERMISSION_DENIED,
        OK,
        PERMISSION_DENIED,
        PERMISSION_DENIED,
        PERMISSION_DENIED,
        OK,
        OK,
    ], results
    assert "a-read" in results[0].error.message
    assert value(results[1]) == b"v"
    assert exists(results[3]) is True
    left = seconds_left(results[6])
    assert left is not None
    assert DECOY_TTL - 60 < left <= DECOY_TTL
    assert value(results[8]) == b"x's"
    assert exists(results[12]) is False
    left = seconds_left(results[13])
    assert left is not None
    assert DECOY_TTL - 60 < left <= DECOY_TTL

    stats = await reader.stats(())
    assert stats.namespace.keys == 3
    assert_confined(stats)
    await assert_holds(admin, expected)
    await assert_not_renewed(admin, [("a",), ("a", "x")])
    other = await admin.must(op_expires_in(("a",), "other"))
    assert seconds_left(other[0]) == float("inf")


async def test_grpc_store_with_a_read_token_raises_permission_denied_for_writes(
    served: Served, admin: Unary
) -> None:
    await admin.must(op_set(("a",), "k", b"v", ttl=DECOY_TTL), op_set(("a", "x"), "k", b"x's"))
    async with GrpcStore.with_client(
        served.target, credentials=served.credentials, token=served.tokens["a-read"]
    ) as store:
        assert await store.get("k") == b"v"
        assert await store.exists("k") is True
        assert await store.expires_in("k") in (DECOY_TTL - 1, DECOY_TTL)
        assert await store.with_namespace("x").get("k") == b"x's"
        assert (await store.stats()).namespace.keys == 2
        refused = [
            store.set("k", b"overwritten"),
            store.with_namespace("x").set("new", b"n"),
            store.delete("k"),
            store.delete_all(),
            store.with_namespace("x").delete_all(),
            store.get("k", renew_for=5000),
            store.increment("counter"),
            store.increment("k", 0),
            store.set_if_absent("new", b"n"),
            store.set_if_present("k", b"overwritten"),
            store.delete_if("k", value=b"v"),
        ]
        for attempt in refused:
            with pytest.raises(PermissionDeniedError) as raised:
                await attempt
            assert raised.value.code == "PERMISSION_DENIED"
        assert await store.get("k") == b"v"  # the stream outlives the refusals
        assert await store.exists("counter") is False
        assert await store.exists("new") is False
    await assert_holds(admin, {(("a",), "k"): b"v", (("a", "x"), "k"): b"x's"})
    await assert_not_renewed(admin, [("a",)])


# --- 3. no token, a wrong one, a malformed header, a revoked one -------------------------------------

BAD_METADATA: dict[str, Metadata] = {
    "missing": (),
    "unknown-token": bearer(WRONG_TOKEN),
    "basic-scheme": (("authorization", "Basic xyz"),),
    "bearer-alone": (("authorization", "Bearer"),),
    "token-without-scheme": (("authorization", WRONG_TOKEN),),
    "other-header": (("x-token", WRONG_TOKEN),),
}


@pytest.mark.parametrize("metadata", BAD_METADATA.values(), ids=BAD_METADATA.keys())
async def test_calls_without_a_valid_token_are_unauthenticated_and_change_nothing(
    admin: Unary, stub: Any, metadata: Metadata
) -> None:
    await admin.must(op_set(("a",), "k", b"kept"), op_set((), "k", b"kept"))
    results = await Unary(stub, metadata).run(*every_kind(()), *every_kind(("a",)))
    assert codes(results) == [UNAUTHENTICATED] * 14, results
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await Unary(stub, metadata).stats(())
    assert raised.value.code() == UNAUTHENTICATED

    stream = Stream(stub, metadata)
    try:
        # The server ends the stream as it opens, before any batch: waiting for that first keeps the
        # status from being lost to a write racing the end (then gRPC says INTERNAL instead).
        assert await asyncio.wait_for(stream.call.code(), 5) == UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.run(op_set((), "k", b"overwritten"), op_delete_all(()))
        assert raised.value.code() == UNAUTHENTICATED
    finally:
        stream.call.cancel()
    await assert_holds(admin, {(("a",), "k"): b"kept", ((), "k"): b"kept"})


@pytest.mark.parametrize("metadata", BAD_METADATA.values(), ids=BAD_METADATA.keys())
async def test_a_refused_stream_ends_unauthenticated_even_with_batches_already_on_their_way(
    admin: Unary, stub: Any, metadata: Metadata
) -> None:
    # Batches written at once, as a client does that does not wait for the stream to be taken: the
    # refusal was lost to them now and then (grpcio said INTERNAL "Internal error from Core").
    await admin.must(op_set((), "k", b"kept"))
    batch = pb.PipelineRequest(id=1, operations=[op_set((), "k", b"overwritten"), op_delete_all(())])
    for _ in range(30):
        call = stub.Pipeline(metadata=metadata, timeout=10)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for _ in range(5):
                await call.write(batch)
        assert await call.code() == UNAUTHENTICATED
        assert "token" in (await call.details() or "")
    await assert_holds(admin, {((), "k"): b"kept"})


async def test_a_refused_stream_that_keeps_sending_ends_within_the_drain_bound(
    admin: Unary, stub: Any
) -> None:
    # A client that goes on writing after its refusal: the server reads and drops its batches for
    # at most a second, then ends the stream. On Python 3.11 the bound was lost now and then
    # (asyncio.wait_for swallowed the timeout's cancellation), and the stream lived on until the
    # client's own deadline (5 of 40 in one run, DEADLINE_EXCEEDED after 10 s).
    await admin.must(op_set((), "k", b"kept"))
    batch = pb.PipelineRequest(id=1, operations=[op_set((), "k", b"overwritten")])
    loop = asyncio.get_running_loop()
    ended_after = []
    for _ in range(25):
        started = loop.time()
        call = stub.Pipeline(timeout=10)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(batch)
        code = await call.code()
        ended_after.append(loop.time() - started)
        # gRPC sometimes reports a status that came while the client was writing as INTERNAL
        # "Internal error from Core": the client's write failed first. Never a deadline.
        assert code in (UNAUTHENTICATED, grpc.StatusCode.INTERNAL), code
    assert max(ended_after) < 3, ended_after
    await assert_holds(admin, {((), "k"): b"kept"})


async def test_two_authorization_headers_are_refused_whichever_comes_first(
    served: Served, admin: Unary, stub: Any
) -> None:
    valid, wrong = bearer(served.tokens["a-rw"]), bearer(WRONG_TOKEN)
    _, before = served.scrape()
    for metadata in (valid + wrong, wrong + valid, valid + valid):
        assert codes(await Unary(stub, metadata).run(op_set((), "k", b"v"))) == [UNAUTHENTICATED]
    _, after = served.scrape()
    assert denials(after, "", "ambiguous_token") - denials(before, "", "ambiguous_token") == 3
    assert (await admin.stats(())).namespace.keys == 0


async def test_a_malformed_request_without_a_token_learns_only_that_it_needs_one(
    channel: Any, served: Served
) -> None:
    set_raw = channel.unary_unary("/nestkv.v1.StoreService/Set")
    garbage = b"\xff\xff\xff"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_raw(garbage, timeout=5)
    assert raised.value.code() == UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_raw(garbage, timeout=5, metadata=bearer(served.tokens["a-rw"]))
    assert raised.value.code() == INVALID_ARGUMENT
    assert "malformed nestkv.v1.SetRequest" in (raised.value.details() or "")


@pytest.mark.parametrize("token", [None, WRONG_TOKEN], ids=["no-token", "unknown-token"])
async def test_grpc_store_without_a_valid_token_raises_authentication_error(
    served: Served, admin: Unary, token: str | None
) -> None:
    async with GrpcStore.with_client(served.target, credentials=served.credentials, token=token) as store:
        for attempt in (store.set("k", b"v"), store.get("k"), store.delete_all(), store.stats()):
            with pytest.raises(AuthenticationError) as raised:
                await attempt
            assert raised.value.code == "UNAUTHENTICATED"
    assert (await admin.stats(())).namespace.keys == 0


async def test_a_revoked_token_is_refused_by_new_calls_and_by_the_streams_it_opened_before(
    served: Served, admin: Unary, stub: Any
) -> None:
    revocable = served.auth_file.mint("revocable", ["r"], "readwrite")
    served.sent.append(revocable)
    await served.reload()
    unary = Unary(stub, bearer(revocable))
    await unary.must(op_set((), "k", b"before"))
    opened = Stream(stub, bearer(revocable))
    survivor = Stream(stub, bearer(served.tokens["a-rw"]))  # a token the reload keeps
    try:
        results = await opened.must(op_set((), "streamed", b"before"), op_get((), "k"))
        assert value(results[1]) == b"before"
        await survivor.must(op_set((), "k", b"a's"))

        served.auth_file.revoke("revocable")
        await served.reload()

        refused = await unary.run(op_get((), "k"), op_set((), "k", b"after"))
        assert codes(refused) == [UNAUTHENTICATED] * 2, refused
        try:
            ran = await opened.run(op_set((), "streamed", b"after"), op_delete_all(()))
        except grpc.aio.AioRpcError as error:
            ended = error.code()
        else:
            pytest.fail(f"the stream of the revoked token ran the batch sent after the reload: {ran}")
        assert ended == UNAUTHENTICATED
        results = await survivor.run(op_get((), "k"))
        assert value(results[0]) == b"a's"
    finally:
        opened.call.cancel()
        survivor.call.cancel()
    async with GrpcStore.with_client(served.target, credentials=served.credentials, token=revocable) as store:
        with pytest.raises(AuthenticationError):
            await store.get("k")
    await assert_holds(
        admin,
        {(("r",), "k"): b"before", (("r",), "streamed"): b"before", (("a",), "k"): b"a's"},
    )


# --- 4. health and reflection need no token ----------------------------------------------------------


async def test_health_and_reflection_answer_without_a_token(channel: Any, stub: Any) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nestkv.v1.StoreService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: set[str] = set()
    async for response in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names |= {service.name for service in response.list_services_response.service}
    assert {"nestkv.v1.StoreService", "grpc.health.v1.Health"} <= names
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # while the store, on the same channel, needs one
        await stub.Exists(pb.ExistsRequest(key="k"))
    assert raised.value.code() == UNAUTHENTICATED


# --- 5. denials in the metrics; no token in the log or the metrics ------------------------------------


def denials(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], token: str, reason: str) -> float:
    return samples.get(("nestkv_auth_denials_total", (("reason", reason), ("token", token))), 0.0)


async def test_denials_are_counted_by_token_name_and_reason(served: Served, admin: Unary, stub: Any) -> None:
    _, before = served.scrape()
    reader = Unary(stub, bearer(served.tokens["a-read"]))
    assert codes(await reader.run(op_set((), "k", b"v"), op_delete_all(()), op_get((), "k"))) == [
        PERMISSION_DENIED,
        PERMISSION_DENIED,
        OK,
    ]
    stream = Stream(stub, bearer(served.tokens["a-read"]))
    try:
        batch = await stream.run(op_delete((), "k"), op_exists((), "k"), op_get((), "k", renew_for=10))
        assert codes(batch) == [PERMISSION_DENIED, OK, PERMISSION_DENIED]
    finally:
        stream.call.cancel()
    missing = await Unary(stub, ()).run(op_get((), "k"), op_exists((), "k"))
    malformed = await Unary(stub, (("authorization", "Basic xyz"),)).run(op_get((), "k"))
    unknown = await Unary(stub, bearer(WRONG_TOKEN)).run(op_get((), "k"), op_set((), "k", b"v"))
    assert codes(missing + malformed + unknown) == [UNAUTHENTICATED] * 5
    _, after = served.scrape()

    assert denials(after, "a-read", "read_only") - denials(before, "a-read", "read_only") == 4
    assert denials(after, "", "missing_token") - denials(before, "", "missing_token") == 3
    assert denials(after, "", "unknown_token") - denials(before, "", "unknown_token") == 2
    assert denials(after, "a-rw", "read_only") == 0


# --- 6. a broken auth file keeps the tokens held -----------------------------------------------------

BROKEN_AUTH_FILES = {
    "invalid-toml": '[[tokens]\nname = "a-rw"\n',
    "bad-digest": '[[tokens]]\nname = "x"\nsha256 = "not hex"\npath = []\naccess = "readwrite"\n',
    "unknown-access": '[[tokens]]\nname = "x"\nsha256 = "' + "0" * 64 + '"\npath = []\naccess = "admin"\n',
    # As `>` leaves it for a moment: valid TOML, no tokens. Taken, it would lock every caller out.
    "empty": "",
}


@pytest.mark.parametrize("broken", BROKEN_AUTH_FILES.values(), ids=BROKEN_AUTH_FILES.keys())
async def test_a_reload_of_a_broken_auth_file_keeps_the_previous_tokens(
    served: Served, admin: Unary, stub: Any, broken: str
) -> None:
    good = served.auth_file.path.read_text()
    a = Unary(stub, bearer(served.tokens["a-rw"]))
    stream = Stream(stub, bearer(served.tokens["a-rw"]))
    try:
        await stream.must(op_set((), "streamed", b"before"))
        served.auth_file.path.write_text(broken)
        await served.reload(kept=True)
        await a.must(op_set((), "k", b"after"))
        await stream.must(op_set((), "streamed", b"after"))
        reader = await Unary(stub, bearer(served.tokens["a-read"])).run(op_get((), "k"), op_delete((), "k"))
        assert codes(reader) == [OK, PERMISSION_DENIED]
        assert value(reader[0]) == b"after"
        assert codes(await Unary(stub, bearer(WRONG_TOKEN)).run(op_get((), "k"))) == [UNAUTHENTICATED]
    finally:
        stream.call.cancel()
        served.auth_file.path.write_text(good)
        await served.reload()
    await assert_holds(admin, {(("a",), "k"): b"after", (("a",), "streamed"): b"after"})


async def test_no_token_appears_in_the_log_or_the_metrics(served: Served, stub: Any) -> None:
    # Last in the module: every token the tests sent, revoked ones included. And some more now.
    for token in (*served.tokens.values(), WRONG_TOKEN):
        await Unary(stub, bearer(token)).run(op_set((), "k", b"v"), op_get((), "k"))
    await served.reload()
    text, _ = served.scrape()
    log = "\n".join(served.process.log)
    assert "auth_denials" in text
    for token in served.sent:
        assert token not in log
        assert token not in text
    assert not _TOKEN_LIKE.search(log), _TOKEN_LIKE.search(log)
    assert not _TOKEN_LIKE.search(text), _TOKEN_LIKE.search(text)
