"""A cluster of real server processes: placement, forwarding, fan-out, a node down, mutual TLS, refusals.

Clusters: `plain` (three plaintext nodes with metrics, for the module's tests that neither stop a node
nor change the members: each works in a namespace of its own), `secure` (three nodes under mutual TLS
with an auth file, metrics and plaintext health ports), and clusters of a test's own where nodes are killed or
the member file changes. The owner of every key is predicted with nestkv.wire.placement, the same
function the servers use, and checked against each node's own figures (Stats `nodes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from nestkv.client import GrpcStore, StoreError, StoreUnavailableError, channel_options
from nestkv.client.routing import Router
from nestkv.server.storage.engine import entry_size
from nestkv.server.storage.expiry import LISTING_BYTES, SLOT_OVERHEAD
from nestkv.server.storage.tree import TRAILER_BYTES, namespace_size
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import peer_pb2_grpc, store_pb2_grpc
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.placement import HASH_NAME, Placement, topology_version
from tests.clusterproc import ClusterProcesses
from tests.errorfields import info_of
from tests.pki import CLUSTER_NAME, AuthFile, Issued, Pki
from tests.polling import eventually
from tests.serverproc import ServerProcess, server_command

MEMBERS = ("node-0", "node-1", "node-2")
PLACEMENT = Placement(MEMBERS)
PEER = "nestkv-peer"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
Metadata = tuple[tuple[str, str], ...]
Entries = list[tuple[tuple[str, ...], str]]
"""(path, key) pairs, the path as the server stores it (a token's root in front)."""

_METRICS_AT = re.compile(r"metrics at (http://\S+/metrics)")
_HEALTH_AT = re.compile(r"health at (\S+:\d+)")


# --- helpers ------------------------------------------------------------------------------------------


def owner_counts(entries: Iterable[tuple[Sequence[str], str]]) -> dict[str, int]:
    """How many of `entries` each member owns, by the placement the servers use."""
    counts = dict.fromkeys(MEMBERS, 0)
    for path, key in entries:
        counts[PLACEMENT.owner(path, key)] += 1
    return counts


def keys_owned_by(member: str, path: Sequence[str], count: int, prefix: str = "k") -> list[str]:
    """The first `count` keys `{prefix}{n}` in `path` that `member` owns."""
    keys: list[str] = []
    n = 0
    while len(keys) < count:
        key = f"{prefix}{n}"
        if PLACEMENT.owner(path, key) == member:
            keys.append(key)
        n += 1
    return keys


def scrape(process: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a node's /metrics page, by name and labels."""
    url = next(match[1] for line in process.log if (match := _METRICS_AT.search(line)))
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def forwarded(cluster: ClusterProcesses) -> dict[str, dict[str, int]]:
    """nestkv_forwarded_operations_total of every node, by destination (absent: 0)."""
    counts: dict[str, dict[str, int]] = {}
    for member in MEMBERS:
        samples = scrape(cluster.nodes[member])
        counts[member] = {
            other: int(samples.get(("nestkv_forwarded_operations_total", (("node", other),)), 0))
            for other in MEMBERS
        }
    return counts


@contextlib.asynccontextmanager
async def channel_to(target: str, credentials: grpc.ChannelCredentials | None = None) -> AsyncIterator[Any]:
    """A grpc.aio channel of the test's own, closed on exit."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=channel_options())
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=channel_options())
    try:
        yield channel
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def pinned(
    target: str, credentials: grpc.ChannelCredentials | None = None, deadline: float = 5.0
) -> AsyncIterator[GrpcStore]:
    """A GrpcStore on a channel of its own to one node (operations time out after `deadline` s): it
    does not route, the node forwards."""
    async with channel_to(target, credentials) as channel:
        store = GrpcStore(channel, timeout=deadline)
        try:
            yield store
        finally:
            await store.close()


async def routed(store: GrpcStore) -> Router:
    """Wait until a routing store (with_client) has read the topology; its router."""
    await store.exists("warm-up")  # the first operation starts the Topology read
    router = store._connection._opened()[3]
    assert router is not None, "a store of with_client routes"
    await eventually(lambda: bool(router.version), within=10)
    return router


def in_namespace(store: GrpcStore, path: Sequence[str]) -> GrpcStore:
    for segment in path:
        store = store.with_namespace(segment)
    return store


async def node_figures(
    stub: Any, path: Sequence[str], metadata: Metadata = ()
) -> tuple[pb.StatsResponse, dict[str, pb.NodeStats]]:
    """Stats of `path`: the response, and each node's own figures by id."""
    response: pb.StatsResponse = await stub.Stats(pb.StatsRequest(path=path), metadata=metadata, timeout=10)
    return response, {node.node_id: node for node in response.nodes}


async def node_keys(stub: Any, path: Sequence[str], metadata: Metadata = ()) -> dict[str, int]:
    """Keys of `path` (with everything below) that each node holds itself."""
    _, nodes = await node_figures(stub, path, metadata)
    return {member: node.namespace.keys for member, node in nodes.items()}


async def pipeline_call(
    stub: Any, operations: Sequence[pb.Operation], metadata: Metadata
) -> list[pb.OperationResult]:
    """One batch on a Pipeline stream of its own; its results (the stream's status raised if it fails)."""
    call = stub.Pipeline(
        iter([pb.PipelineRequest(id=1, operations=operations)]), metadata=metadata, timeout=10
    )
    results: list[pb.OperationResult] = []
    async for response in call:
        assert response.id == 1
        results.extend(response.results)
    return results


async def stream_status(stub: Any, operations: Sequence[pb.Operation], metadata: Metadata) -> grpc.StatusCode:
    """The status a Pipeline stream opened with `metadata` ends with.

    A stream the server refuses ends as it opens; one it takes is then sent one batch and closed.
    (Writing to a stream the server is ending may fail inside gRPC core, which grpc.aio reports as
    INTERNAL in place of the server's status: so nothing is written until the stream is taken.)
    """
    call = stub.Pipeline(metadata=metadata, timeout=10)
    ended = asyncio.ensure_future(call.code())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(ended), 1.0)
    if not ended.done():
        await call.write(pb.PipelineRequest(id=1, operations=operations))
        await call.done_writing()
    code: grpc.StatusCode = await ended
    return code


async def fails_within(
    operation: Awaitable[object], error: type[BaseException], seconds: float
) -> BaseException:
    """Await `operation`, which must raise `error` within `seconds`; the error."""
    started = time.monotonic()
    with pytest.raises(error) as raised:
        async with asyncio.timeout(seconds + 10):  # never hang the suite, whatever the client does
            await operation
    took = time.monotonic() - started
    assert took < seconds, f"{raised.value!r} came after {took:.2f} s"
    return raised.value


async def until_ok(attempt: Callable[[], Awaitable[None]], within: float = 30.0) -> None:
    """Run `attempt` until it raises no StoreError / assertion, for at most `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            try:
                await attempt()
            except (StoreError, AssertionError):
                await asyncio.sleep(0.1)
            else:
                return


# --- the plaintext cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    """Three plaintext nodes with metrics, kept in memory; each test uses namespaces of its own."""
    with ClusterProcesses(tmp_path_factory.mktemp("plain"), 3, "--metrics-port", "0", data=False) as nodes:
        yield nodes


async def test_every_node_answers_topology_with_the_same_members_and_its_own_id(
    plain: ClusterProcesses,
) -> None:
    addresses = {member: plain.target(member) for member in MEMBERS}
    for member in MEMBERS:
        async with channel_to(plain.target(member)) as channel:
            response = await store_pb2_grpc.StoreServiceStub(channel).Topology(pb.TopologyRequest())
        assert [(m.id, m.address) for m in response.members] == list(addresses.items())
        assert response.version == topology_version(addresses)
        assert response.hash == HASH_NAME
        assert list(response.root) == []
        assert response.node_id == member


async def test_a_single_server_answers_topology_with_no_members(server: ServerProcess) -> None:
    async with channel_to(server.target) as channel:
        response = await store_pb2_grpc.StoreServiceStub(channel).Topology(pb.TopologyRequest())
    assert list(response.members) == []
    assert response.version == ""
    assert response.node_id == ""
    assert response.hash == HASH_NAME


async def test_keys_written_through_one_node_land_on_their_owners(plain: ClusterProcesses) -> None:
    entries: Entries = [
        (path, f"key-{n}")
        for path in (("land", "a"), ("land", "b"), ("land", "a", "deep"))
        for n in range(100)
    ]
    expected = owner_counts(entries)
    assert all(count > 0 for count in expected.values()), expected
    async with pinned(plain.target("node-1")) as store:
        await asyncio.gather(
            *(in_namespace(store, path).set(key, f"{'/'.join(path)}:{key}") for path, key in entries)
        )
    async with channel_to(plain.target("node-1")) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        assert await node_keys(stub, ["land"]) == expected
        for path in (("land", "a", "deep"), ("land", "b")):
            assert await node_keys(stub, path) == owner_counts(e for e in entries if e[0] == path)

    def check(values: list[bytes | None]) -> None:
        assert values == [f"{'/'.join(path)}:{key}".encode() for path, key in entries]

    async with pinned(plain.target("node-2")) as store:
        check(await asyncio.gather(*(in_namespace(store, path).get(key) for path, key in entries)))
    async with GrpcStore.with_client(plain.target("node-0")) as store:
        await routed(store)
        check(await asyncio.gather(*(in_namespace(store, path).get(key) for path, key in entries)))


OPERATIONS_PER_KEY = 6


async def workload(store: GrpcStore, keys: Sequence[str]) -> None:
    """set, get, exists, expires_in, delete and exists again of every key: OPERATIONS_PER_KEY a key."""
    await asyncio.gather(*(store.set(key, b"v", expires_in=600) for key in keys))
    assert await asyncio.gather(*(store.get(key) for key in keys)) == [b"v"] * len(keys)
    assert all(await asyncio.gather(*(store.exists(key) for key in keys)))
    assert all(await asyncio.gather(*(store.expires_in(key) for key in keys)))
    await asyncio.gather(*(store.delete(key) for key in keys))
    assert not any(await asyncio.gather(*(store.exists(key) for key in keys)))


async def test_a_routing_client_sends_every_operation_to_its_owner(plain: ClusterProcesses) -> None:
    path = ("hop", "routed")
    keys = [f"key-{n}" for n in range(60)]
    async with GrpcStore.with_client(plain.target("node-0")) as client:
        await routed(client)
        store = in_namespace(client, path)
        await store.get("settle")  # nothing of the warm-up is still on its way
        before = forwarded(plain)
        await workload(store, keys)
        await store.delete_all()  # routed by the topology: each node empties its own part
        assert forwarded(plain) == before


async def test_a_pinned_node_forwards_exactly_the_operations_other_nodes_own(plain: ClusterProcesses) -> None:
    path = ("hop", "pinned")
    keys = [f"key-{n}" for n in range(60)]
    owned = owner_counts((path, key) for key in keys)
    assert owned["node-0"], owned
    assert owned["node-2"], owned
    async with pinned(plain.target("node-1")) as client:
        store = in_namespace(client, path)
        before = forwarded(plain)
        await workload(store, keys)
        after_workload = forwarded(plain)
        await store.delete_all()  # not routed: node-1 sends it to every other node
        after_delete_all = forwarded(plain)
    expected = {member: dict(counts) for member, counts in before.items()}
    for member in ("node-0", "node-2"):
        expected["node-1"][member] += OPERATIONS_PER_KEY * owned[member]
    assert after_workload == expected
    for member in ("node-0", "node-2"):
        expected["node-1"][member] += 1
    assert after_delete_all == expected


async def test_stats_gives_each_node_its_own_figures_and_their_sums(plain: ClusterProcesses) -> None:
    path = ("figures",)
    # Keys of one length and values of one size: every key takes the same bytes.
    entries: Entries = [((*path, f"ns{n % 3}"), f"key-{n:03d}") for n in range(120)]
    async with pinned(plain.target("node-1")) as store:
        await asyncio.gather(
            *(
                in_namespace(store, where).set(key, b"x" * 50, expires_in=600 if n % 2 else None)
                for n, (where, key) in enumerate(entries)
            )
        )
    expected = owner_counts(entries)
    expiring = owner_counts(entry for n, entry in enumerate(entries) if n % 2)
    answers = []
    for member in MEMBERS:
        async with channel_to(plain.target(member)) as channel:
            answers.append(await node_figures(store_pb2_grpc.StoreServiceStub(channel), path))
    for response, nodes in answers:
        assert sorted(nodes) == list(MEMBERS)
        assert {member: node.namespace.keys for member, node in nodes.items()} == expected
        assert {member: node.namespace.expiring_keys for member, node in nodes.items()} == expiring
        total = response.namespace
        assert total.keys == sum(node.namespace.keys for node in nodes.values()) == len(entries)
        assert total.bytes == sum(node.namespace.bytes for node in nodes.values())
        assert total.expiring_keys == sum(expiring.values())
        assert total.child_namespaces == 3
        for member, node in nodes.items():
            # Its entries, its namespaces (figures and the ns{i} it holds keys of), and a list in the
            # expiry wheel for each namespace with expiring keys (two if the writes crossed a slot).
            mine = [
                (where, n) for n, (where, key) in enumerate(entries) if PLACEMENT.owner(where, key) == member
            ]
            entry = entry_size("key-000", b"x" * (50 + TRAILER_BYTES))  # the value, its version and deadline
            namespaces = {where[-1] for where, _ in mine}
            listed = {where[-1] for where, n in mine if n % 2}
            counted = node.namespace.keys * entry + expiring[member] * LISTING_BYTES
            counted += namespace_size("figures") + sum(namespace_size(name) for name in namespaces)
            lists, rest = divmod(node.namespace.bytes - counted, SLOT_OVERHEAD)
            assert rest == 0
            assert len(listed) <= lists <= 2 * len(listed)
        server = response.server
        assert server.keys == sum(node.server.keys for node in nodes.values())
        assert server.memory_bytes == sum(node.server.memory_bytes for node in nodes.values())
        assert all(node.server.keys >= node.namespace.keys for node in nodes.values())
    # Every node reports the same figures of each node (uptimes apart).
    for member in MEMBERS:
        figures = {(nodes[member].namespace.keys, nodes[member].namespace.bytes) for _, nodes in answers}
        assert len(figures) == 1


@pytest.mark.parametrize("client", ["pinned", "routing"])
async def test_delete_all_empties_the_namespace_on_every_node_and_nothing_else(
    plain: ClusterProcesses, client: str
) -> None:
    base = ("wipe", client)
    gone, below, kept, alike = (*base, "gone"), (*base, "gone", "below"), (*base, "kept"), (*base, "gone2")
    entries: Entries = [(path, f"key-{n}") for path in (gone, below, kept, alike) for n in range(45)]
    async with contextlib.AsyncExitStack() as stack:
        if client == "pinned":
            store = await stack.enter_async_context(pinned(plain.target("node-1")))
        else:
            store = await stack.enter_async_context(GrpcStore.with_client(plain.target("node-1")))
            await routed(store)
        await asyncio.gather(*(in_namespace(store, path).set(key, b"v") for path, key in entries))
        stub = store_pb2_grpc.StoreServiceStub(
            await stack.enter_async_context(channel_to(plain.target("node-0")))
        )
        assert await node_keys(stub, gone) == owner_counts(e for e in entries if e[0][:3] == gone)
        await in_namespace(store, gone).delete_all()
        assert await node_keys(stub, gone) == dict.fromkeys(MEMBERS, 0)
        assert await node_keys(stub, kept) == owner_counts(e for e in entries if e[0] == kept)
        assert await node_keys(stub, alike) == owner_counts(e for e in entries if e[0] == alike)
        assert not any(await asyncio.gather(*(in_namespace(store, p).exists(k) for p, k in entries[:90])))
        assert all(await asyncio.gather(*(in_namespace(store, p).exists(k) for p, k in entries[90:])))


async def test_a_stream_runs_later_batches_while_an_earlier_one_waits_on_a_paused_node(
    plain: ClusterProcesses,
) -> None:
    # A batch forwarded to a paused node waits for its answer (up to the 3 s peer timeout). The
    # stream runs the batches behind it meanwhile, and answers them in order once it is answered.
    path = ("ahead",)
    [stalled_key] = keys_owned_by("node-2", path, 1)
    [local_key] = keys_owned_by("node-0", path, 1)
    paused = plain.nodes["node-2"].process
    async with channel_to(plain.target("node-0")) as channel, channel_to(plain.target("node-0")) as other:
        call = store_pb2_grpc.StoreServiceStub(channel).Pipeline(timeout=20)
        reader = store_pb2_grpc.StoreServiceStub(other)
        paused.send_signal(signal.SIGSTOP)
        try:
            for number, key in ((1, stalled_key), (2, local_key)):
                write = pb.Operation(set=pb.SetRequest(path=path, key=key, value=b"v"))
                await call.write(pb.PipelineRequest(id=number, operations=[write]))
            read = pb.GetRequest(path=path, key=local_key)
            started = time.monotonic()
            for _ in range(200):  # batch 2 ran before batch 1 can be answered (3 s)
                if (await reader.Get(read, timeout=5)).found:
                    break
                await asyncio.sleep(0.01)
            assert (await reader.Get(read, timeout=5)).found
            assert time.monotonic() - started < 2.5
        finally:
            paused.send_signal(signal.SIGCONT)
        answered = [await call.read(), await call.read()]
        assert [response.id for response in answered] == [1, 2]
        assert answered[1].results[0].WhichOneof("result") == "set"
        await call.done_writing()


async def test_a_stream_whose_caller_takes_any_order_answers_later_batches_before_one_waiting(
    plain: ClusterProcesses,
) -> None:
    # With any_order, batch 2 (here) is answered while batch 1 still waits on a paused node: a
    # pinned client's operations on healthy nodes' keys do not wait behind it (head of line).
    path = ("any-order",)
    [stalled_key] = keys_owned_by("node-2", path, 1)
    [local_key] = keys_owned_by("node-0", path, 1)
    paused = plain.nodes["node-2"].process
    async with channel_to(plain.target("node-0")) as channel:
        call = store_pb2_grpc.StoreServiceStub(channel).Pipeline(timeout=20)
        paused.send_signal(signal.SIGSTOP)
        try:
            for number, key in ((1, stalled_key), (2, local_key)):
                write = pb.Operation(set=pb.SetRequest(path=path, key=key, value=b"v"))
                await call.write(pb.PipelineRequest(id=number, operations=[write], any_order=True))
            started = time.monotonic()
            first = await call.read()
            waited = time.monotonic() - started
        finally:
            paused.send_signal(signal.SIGCONT)
        second = await call.read()
        assert [first.id, second.id] == [2, 1]
        assert first.results[0].WhichOneof("result") == "set"
        assert waited < 2.5  # not after batch 1's answer (up to the 3 s peer timeout)
        await call.done_writing()


async def test_a_pinned_client_s_operations_on_healthy_keys_do_not_wait_behind_a_paused_node(
    plain: ClusterProcesses,
) -> None:
    path = ("pinned-ahead",)
    [stalled_key] = keys_owned_by("node-2", path, 1)
    [local_key] = keys_owned_by("node-0", path, 1)
    paused = plain.nodes["node-2"].process
    async with channel_to(plain.target("node-0")) as channel:
        store = GrpcStore(channel, timeout=10).with_namespace(*path)
        paused.send_signal(signal.SIGSTOP)
        try:
            stalled = asyncio.create_task(store.set(stalled_key, b"v"))
            await asyncio.sleep(0.1)  # its batch went first
            started = time.monotonic()
            await store.set(local_key, b"v")
            waited = time.monotonic() - started
            assert not stalled.done()
        finally:
            paused.send_signal(signal.SIGCONT)
        await stalled
    assert waited < 1.5  # not behind the stalled one (3 s peer timeout)


async def test_a_stream_closed_with_forwarded_operations_pending_leaves_no_noise_in_the_log(
    plain: ClusterProcesses,
) -> None:
    # The client goes away while node-0 still waits on a paused node-2 for its batches' answers:
    # they come (or time out) to nobody, and nothing is left unawaited or unretrieved.
    path = ("gone",)
    stalled = keys_owned_by("node-2", path, 40)
    forwarding = plain.nodes["node-0"]
    paused = plain.nodes["node-2"].process
    seen = len(forwarding.log)
    paused.send_signal(signal.SIGSTOP)
    try:
        async with channel_to(plain.target("node-0")) as channel:
            call = store_pb2_grpc.StoreServiceStub(channel).Pipeline(timeout=20)
            for number, key in enumerate(stalled):
                write = pb.Operation(set=pb.SetRequest(path=path, key=key, value=b"v"))
                await call.write(pb.PipelineRequest(id=number, operations=[write]))
            await asyncio.sleep(0.5)
            call.cancel()
        await asyncio.sleep(4)  # past the 3 s peer timeout: the answers fail, to nobody
    finally:
        paused.send_signal(signal.SIGCONT)
    await asyncio.sleep(0.5)
    noise = [
        line
        for line in forwarding.log[seen:]
        if "never retrieved" in line or "never awaited" in line or "Traceback" in line
    ]
    assert noise == []


async def test_an_operation_from_a_peer_is_never_forwarded_again(plain: ClusterProcesses) -> None:
    # node-0 sends node-1 keys that node-1's list gives to node-2 (lists differ for a moment while a
    # member change reaches every node). node-1 must not send them on: at most it tells the sender
    # where the key lives now (ABORTED with moved_to, for the sender to follow once), or runs them.
    path = ("peer", "once")
    unary_key, stream_key = keys_owned_by("node-2", path, 2)
    peer: Metadata = ((PEER, "node-0"),)
    before = forwarded(plain)
    async with channel_to(plain.target("node-1")) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        peer_stub = peer_pb2_grpc.PeerServiceStub(channel)
        results = await pipeline_call(
            peer_stub,
            [
                pb.Operation(set=pb.SetRequest(path=path, key=stream_key, value=b"stream")),
                pb.Operation(get=pb.GetRequest(path=path, key=stream_key)),
            ],
            peer,
        )
        # The sender is told the owner; nothing was stored, nothing sent on.
        assert [result.WhichOneof("result") for result in results] == ["error", "error"], results
        for result in results:
            assert result.error.code == grpc.StatusCode.ABORTED.value[0], results
            assert result.error.moved_to.id == "node-2", results
            assert result.error.moved_to.address == plain.target("node-2"), results
        assert await node_keys(stub, path) == {"node-0": 0, "node-1": 0, "node-2": 0}
        # Sent again marked redirected (another node said node-1 owns it), it runs on node-1.
        results = await pipeline_call(
            peer_stub,
            [
                pb.Operation(set=pb.SetRequest(path=path, key=stream_key, value=b"stream")),
                pb.Operation(get=pb.GetRequest(path=path, key=stream_key)),
            ],
            (*peer, ("nestkv-peer-mode", "redirected")),
        )
        assert [result.WhichOneof("result") for result in results] == ["set", "get"], results
        assert results[1].get.value == b"stream"
        assert await node_keys(stub, path) == {"node-0": 0, "node-1": 1, "node-2": 0}
        assert forwarded(plain) == before
        # Sent to StoreService, the peer header counts for nothing: a caller's call, forwarded.
        await stub.Set(pb.SetRequest(path=path, key=unary_key, value=b"unary"), metadata=peer, timeout=10)
        assert await node_keys(stub, path) == {"node-0": 0, "node-1": 1, "node-2": 1}
        assert forwarded(plain)["node-1"]["node-2"] == before["node-1"]["node-2"] + 1
        await stub.DeleteAll(pb.DeleteAllRequest(path=path), timeout=10)
        assert await node_keys(stub, path) == dict.fromkeys(MEMBERS, 0)


async def test_a_peer_header_naming_no_member_is_unauthenticated(plain: ClusterProcesses) -> None:
    path = ("peer", "stranger")
    key = keys_owned_by("node-1", path, 1)[0]
    stranger: Metadata = ((PEER, "node-9"),)
    async with channel_to(plain.target("node-1")) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        peer_stub = peer_pb2_grpc.PeerServiceStub(channel)
        # A member it does not know, or no peer header at all: PeerService admits neither.
        for metadata, named in ((stranger, "node-9"), ((), "nestkv-peer")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await peer_stub.Stats(pb.StatsRequest(path=path), metadata=metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert named in (raised.value.details() or "")
            assert info_of(rpc_status.from_call(raised.value).details).reason == "NODES_ONLY"
            operation = pb.Operation(set=pb.SetRequest(path=path, key=key, value=b"x"))
            assert await stream_status(peer_stub, [operation], metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert await node_keys(stub, path) == dict.fromkeys(MEMBERS, 0)


# --- a node down --------------------------------------------------------------------------------------


async def test_a_node_down_fails_only_its_keys_and_they_come_back_with_it(tmp_path: Path) -> None:
    path = ("down", "kept")
    wiped = ("down", "wiped")
    keys = [f"key-{n}" for n in range(60)]
    lost = [key for key in keys if PLACEMENT.owner(path, key) == "node-2"]
    alive = [key for key in keys if PLACEMENT.owner(path, key) != "node-2"]
    assert lost
    assert alive
    timeout = 3.0
    within = timeout + 1.5
    with ClusterProcesses(tmp_path, 3, "--fsync", "always") as cluster:
        async with (
            GrpcStore.with_client(cluster.target("node-0"), timeout=timeout) as routing,
            pinned(cluster.target("node-1"), deadline=timeout) as pinned_store,
        ):
            await routed(routing)
            store = in_namespace(routing, path)
            await asyncio.gather(*(store.set(key, key) for key in keys))
            await asyncio.gather(*(in_namespace(routing, wiped).set(key, key) for key in keys))
            cluster.nodes["node-2"].stop(signal.SIGKILL)

            for client in (routing, pinned_store):
                kept = in_namespace(client, path)
                failing: list[Awaitable[object]] = [kept.get(key) for key in lost[:3]]
                failing += [kept.set(key, b"new") for key in lost[:3]]
                failing.append(kept.exists(lost[0]))
                errors = await asyncio.gather(
                    *(fails_within(operation, StoreUnavailableError, within) for operation in failing),
                    fails_within(in_namespace(client, wiped).delete_all(), StoreUnavailableError, within),
                )
                assert "node-2" in str(errors[-1])
                assert "delete_all did not reach 1 of 3 nodes" in str(errors[-1])
                assert await asyncio.gather(*(kept.get(key) for key in alive)) == [k.encode() for k in alive]
                await kept.set(alive[0], alive[0])
            # Stats asks every node: it fails naming node-2 (given more time than the operations above:
            # see test_stats_with_a_node_down_fails_within_the_client_s_timeout).
            async with (
                GrpcStore.with_client(cluster.target("node-1"), timeout=10) as routing_10,
                pinned(cluster.target("node-0"), deadline=10) as pinned_10,
            ):
                for failed in await asyncio.gather(
                    fails_within(routing_10.stats(), StoreUnavailableError, 10),
                    fails_within(pinned_10.stats(), StoreUnavailableError, 10),
                ):
                    assert "stats did not reach 1 of 3 nodes: node-2" in str(failed)

            cluster.nodes["node-2"] = cluster.node("node-2").start()

            async def every_key_everywhere() -> None:
                for member in MEMBERS:
                    async with pinned(cluster.target(member), deadline=timeout) as through:
                        values = await asyncio.gather(*(in_namespace(through, path).get(k) for k in keys))
                        assert values == [key.encode() for key in keys]
                values = await asyncio.gather(*(store.get(key) for key in keys))
                assert values == [key.encode() for key in keys]

            await until_ok(every_key_everywhere)
            async with channel_to(cluster.target("node-0")) as channel:
                stub = store_pb2_grpc.StoreServiceStub(channel)
                assert await node_keys(stub, path) == owner_counts((path, key) for key in keys)
                # delete_all said node-2's keys remain: they do, and only node-2's.
                assert await node_keys(stub, wiped) == {
                    "node-0": 0,
                    "node-1": 0,
                    "node-2": owner_counts((wiped, key) for key in keys)["node-2"],
                }


async def test_stats_with_a_node_down_fails_within_the_client_s_timeout(tmp_path: Path) -> None:
    cluster = ClusterProcesses(tmp_path, 2, data=False)
    try:
        cluster.start(["node-0"])  # node-1 is a member that never answers
        async with (
            GrpcStore.with_client(cluster.target("node-0"), timeout=3) as routing,
            pinned(cluster.target("node-0"), deadline=3) as pinned_store,
        ):
            for store in (routing, pinned_store):
                error = await fails_within(store.stats(), StoreUnavailableError, 3.5)
                assert "node-1" in str(error)
    finally:
        cluster.stop()


# --- mutual TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secure:
    """Three nodes under mutual TLS with an auth file; a tenant token rooted at ["tenant"], an admin's,
    and one rooted at ["quoted"] with a byte quota of QUOTA."""

    cluster: ClusterProcesses
    pki: Pki
    node_cert: Issued
    tenant: str
    admin: str
    quoted: str

    def credentials(self, client: Issued | None = None) -> grpc.ChannelCredentials:
        return self.pki.credentials(client=client or self.pki.client)

    def with_token(self, token: str, client: Issued | None = None) -> grpc.ChannelCredentials:
        return grpc.composite_channel_credentials(
            self.credentials(client), grpc.access_token_call_credentials(token)
        )


@pytest.fixture(scope="module")
def secure(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    directory = tmp_path_factory.mktemp("secure")
    node_cert = pki.ca.issue_node("cluster-node", MEMBERS)
    auth_file = AuthFile(directory / "tokens.toml")
    tenant = auth_file.mint("tenant", ["tenant"], "readwrite")
    admin = auth_file.mint("admin", [], "readwrite")
    quoted = auth_file.mint("quoted", ["quoted"], "readwrite", max_bytes=QUOTA)
    args = (
        *("--tls-cert", str(node_cert.cert), "--tls-key", str(node_cert.key)),
        *("--tls-client-ca", str(pki.ca.cert), "--auth-file", str(auth_file.path)),
        *("--cluster-name", CLUSTER_NAME),
        *("--health-port", "0", "--metrics-port", "0"),
    )
    with ClusterProcesses(directory, 3, *args, data=False) as cluster:
        yield Secure(cluster, pki, node_cert, tenant, admin, quoted)


async def test_mutual_tls_cluster_serves_a_tenant_through_both_clients(secure: Secure) -> None:
    cluster = secure.cluster
    routed_path, pinned_path = ("m", "routed"), ("m", "pinned")
    keys = [f"key-{n}" for n in range(60)]
    async with (
        GrpcStore.with_client(
            cluster.target("node-0"), credentials=secure.credentials(), token=secure.tenant
        ) as routing,
        pinned(cluster.target("node-1"), secure.with_token(secure.tenant)) as pinned_store,
    ):
        router = await routed(routing)
        assert router.members == {member: cluster.target(member) for member in MEMBERS}
        await routing.get("settle")
        before = forwarded(cluster)
        # The routing client puts the token's root in front of the path, as the servers do: no hop.
        await asyncio.gather(*(in_namespace(routing, routed_path).set(key, key) for key in keys))
        values = await asyncio.gather(*(in_namespace(routing, routed_path).get(key) for key in keys))
        assert values == [key.encode() for key in keys]
        assert forwarded(cluster) == before
        await asyncio.gather(*(in_namespace(pinned_store, pinned_path).set(key, key) for key in keys))
        for store in (routing, pinned_store):
            for path in (routed_path, pinned_path):
                values = await asyncio.gather(*(in_namespace(store, path).get(key) for key in keys))
                assert values == [key.encode() for key in keys]

    for member in MEMBERS:
        async with channel_to(cluster.target(member), secure.with_token(secure.tenant)) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            topology = await stub.Topology(pb.TopologyRequest(), timeout=10)
            assert list(topology.root) == ["tenant"]
            assert topology.node_id == member
            assert [m.id for m in topology.members] == list(MEMBERS)

    # Each key is on the owner of ["tenant", *path]: the tenant's figures per node, and the admin's.
    entries: Entries = [(("tenant", *path), key) for path in (routed_path, pinned_path) for key in keys]
    expected = owner_counts(entries)
    unrooted = owner_counts((path[1:], key) for path, key in entries)
    assert expected != unrooted  # the check below tells the two apart
    async with channel_to(cluster.target("node-2"), secure.credentials()) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        assert await node_keys(stub, ["m"], (("authorization", f"Bearer {secure.tenant}"),)) == expected
        admin = (("authorization", f"Bearer {secure.admin}"),)
        assert await node_keys(stub, ["tenant", "m"], admin) == expected
        assert await node_keys(stub, ["m"], admin) == dict.fromkeys(MEMBERS, 0)


async def test_a_tenant_cannot_reach_outside_its_root_through_forwarding(secure: Secure) -> None:
    cluster = secure.cluster
    streamed, unary = ("escape", "streamed"), ("escape", "unary")

    def moved_by_the_root(path: tuple[str, ...]) -> list[str]:
        """Keys whose owner differs with and without the root: a node forwarding by the path as sent
        (or a peer scoping it again) would put them elsewhere."""
        keys = (f"key-{n}" for n in range(300))
        return [key for key in keys if PLACEMENT.owner(path, key) != PLACEMENT.owner(("tenant", *path), key)][
            :20
        ]

    written = {streamed: moved_by_the_root(streamed), unary: moved_by_the_root(unary)}
    tenant_credentials = secure.with_token(secure.tenant)
    # Through node-1, which forwards what it does not own: in Pipeline batches (GrpcStore) and as
    # one-operation calls.
    async with pinned(cluster.target("node-1"), tenant_credentials) as store:
        await asyncio.gather(
            *(in_namespace(store, streamed).set(key, b"tenant's") for key in written[streamed])
        )
    async with channel_to(cluster.target("node-1"), tenant_credentials) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for key in written[unary]:
            await stub.Set(pb.SetRequest(path=unary, key=key, value=b"tenant's"), timeout=10)
        # A segment ".." is a name like any other: it does not climb out of the root.
        await stub.Set(pb.SetRequest(path=("..", "escape"), key="k", value=b"climbed"), timeout=10)

    admin: Metadata = (("authorization", f"Bearer {secure.admin}"),)
    async with channel_to(cluster.target("node-0"), secure.credentials()) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for path, keys in written.items():
            inside = [
                await stub.Get(pb.GetRequest(path=("tenant", *path), key=k), metadata=admin) for k in keys
            ]
            assert [answer.value for answer in inside] == [b"tenant's"] * len(keys)
            outside = [await stub.Get(pb.GetRequest(path=path, key=k), metadata=admin) for k in keys]
            assert not any(answer.found for answer in outside)
            assert await node_keys(stub, ("tenant", *path), admin) == owner_counts(
                (("tenant", *path), key) for key in keys
            )
        assert await node_keys(stub, ("escape",), admin) == dict.fromkeys(MEMBERS, 0)
        assert (await stub.Get(pb.GetRequest(path=("tenant", "..", "escape"), key="k"), metadata=admin)).found
        assert await node_keys(stub, ("..",), admin) == dict.fromkeys(MEMBERS, 0)


async def test_a_caller_cannot_pose_as_a_peer_without_a_member_certificate(secure: Secure) -> None:
    cluster = secure.cluster
    path = ("impostor",)
    key = keys_owned_by("node-1", path, 1)[0]
    admin: Metadata = (("authorization", f"Bearer {secure.admin}"),)
    as_peer: Metadata = ((PEER, "node-0"),)
    with_token: Metadata = (*as_peer, ("authorization", f"Bearer {secure.tenant}"))
    request = pb.SetRequest(path=path, key=key, value=b"posed")
    async with channel_to(cluster.target("node-1"), secure.credentials()) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        peer_stub = peer_pb2_grpc.PeerServiceStub(channel)
        for metadata in (as_peer, with_token):
            assert await stream_status(peer_stub, [pb.Operation(set=request)], metadata) == UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await peer_stub.Stats(pb.StatsRequest(), metadata=metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # To StoreService the header is nothing: without a token, refused; with one, the
        # tenant's own write, under its root.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Set(request, metadata=as_peer, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.Set(request, metadata=with_token, timeout=10)
        assert await node_keys(stub, path, admin) == dict.fromkeys(MEMBERS, 0)
        assert sum((await node_keys(stub, ("tenant", *path), admin)).values()) == 1
        await stub.DeleteAll(pb.DeleteAllRequest(path=("tenant", *path)), metadata=admin, timeout=10)
    # The node certificate, which names the members, is admitted as a peer (so the refusals above are
    # the certificate's): its call runs on node-1 as sent, with no token.
    async with channel_to(cluster.target("node-1"), secure.credentials(secure.node_cert)) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        await pipeline_call(peer_pb2_grpc.PeerServiceStub(channel), [pb.Operation(set=request)], as_peer)
        assert await node_keys(stub, path, admin) == {"node-0": 0, "node-1": 1, "node-2": 0}
        await stub.DeleteAll(pb.DeleteAllRequest(path=path), metadata=admin, timeout=10)
        assert await node_keys(stub, path, admin) == dict.fromkeys(MEMBERS, 0)


async def test_a_client_certificate_naming_no_member_cannot_pose_as_a_peer_by_its_own_name(
    secure: Secure,
) -> None:
    cluster = secure.cluster
    path = ("impostor", "own-name")
    key = keys_owned_by("node-1", path, 1)[0]
    admin: Metadata = (("authorization", f"Bearer {secure.admin}"),)
    # The ordinary client certificate's common name is "client": no member is called that.
    as_itself: Metadata = ((PEER, "client"), ("authorization", f"Bearer {secure.tenant}"))
    request = pb.SetRequest(path=path, key=key, value=b"posed")
    async with channel_to(cluster.target("node-1"), secure.credentials()) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        peer_stub = peer_pb2_grpc.PeerServiceStub(channel)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await peer_stub.Stats(pb.StatsRequest(), metadata=as_itself, timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await stream_status(peer_stub, [pb.Operation(set=request)], as_itself) == UNAUTHENTICATED
            assert await node_keys(stub, path, admin) == dict.fromkeys(MEMBERS, 0)
        finally:
            await stub.DeleteAll(pb.DeleteAllRequest(path=path[:1]), metadata=admin, timeout=10)


@pytest.mark.parametrize(
    "names",
    [
        pytest.param([], id="common-name"),
        pytest.param([x509.RFC822Name("node-0")], id="email"),
        pytest.param([x509.UniformResourceIdentifier("node-0")], id="uri"),
        pytest.param([x509.DNSName("node-0")], id="bare-node-id"),
        pytest.param([x509.DNSName(f"node-0.other-{CLUSTER_NAME}")], id="another-cluster"),
        pytest.param([x509.DNSName(f"node-0.{CLUSTER_NAME}.evil")], id="cluster-name-inside"),
    ],
)
async def test_only_the_dns_name_node_dot_cluster_name_makes_a_certificate_a_peer(
    secure: Secure, names: list[x509.GeneralName], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A certificate of the cluster's CA that names node-0 as its common name (all of them do), an
    email, a URI, a bare DNS name, or node-0 of another cluster (two deployments under one CA)."""
    cluster = secure.cluster
    impostor = secure.pki.ca.issue_with_names("node-0", names)
    path = ("impostor", "by-certificate")
    key = keys_owned_by("node-1", path, 1)[0]
    admin: Metadata = (("authorization", f"Bearer {secure.admin}"),)
    as_peer: Metadata = ((PEER, "node-0"),)
    request = pb.SetRequest(path=path, key=key, value=b"posed")
    async with channel_to(cluster.target("node-1"), secure.credentials(impostor)) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        peer_stub = peer_pb2_grpc.PeerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await peer_stub.Stats(pb.StatsRequest(), metadata=as_peer, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert f"carries the DNS name 'node-0.{CLUSTER_NAME}'" in (raised.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await peer_stub.Ping(peer_pb.PingRequest(), metadata=as_peer, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await stream_status(peer_stub, [pb.Operation(set=request)], as_peer) == UNAUTHENTICATED
        entry = peer_pb.HandOffEntry(path=path, key=key, value=b"planted")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await peer_stub.HandOff(
                iter([peer_pb.HandOffRequest(topology_version="", entries=[entry])]),
                metadata=as_peer,
                timeout=10,
            )
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await node_keys(stub, path, admin) == dict.fromkeys(MEMBERS, 0)


QUOTA = 64 * 1024


async def test_a_quota_holds_on_every_node_for_writes_forwarded_to_it(secure: Secure) -> None:
    # Pinned to node-1: the writes node-0 and node-2 own reach them forwarded, with the token's
    # root in front; each owner checks the quota on its share, which it knows from its own file.
    cluster = secure.cluster
    async with pinned(cluster.target("node-1"), secure.with_token(secure.quoted)) as store:
        refusals: list[str] = []
        for n in range(3 * QUOTA // 1000 + 200):
            try:
                await store.set(f"k{n}", b"x" * 1000)
            except StoreError as error:
                refusals.append(str(error))
        stats = await store.stats()
    assert refusals
    assert all("a byte quota over this namespace is reached" in refusal for refusal in refusals)
    assert sorted(stats.nodes) == list(MEMBERS)
    for node in stats.nodes.values():
        assert node.quota is not None
        assert node.quota.max_bytes == QUOTA
        assert QUOTA - 2_000 < node.quota.used_bytes <= QUOTA  # every node filled its share, no more
    assert stats.quota is not None
    assert stats.quota.used_bytes == max(node.quota.used_bytes for node in stats.nodes.values() if node.quota)


async def test_a_tenant_s_stats_show_no_server_wide_figures_of_any_node(secure: Secure) -> None:
    cluster = secure.cluster
    async with pinned(cluster.target("node-0"), secure.with_token(secure.admin)) as admin:
        await asyncio.gather(*(in_namespace(admin, ["other-tenant"]).set(f"k{n}", b"x") for n in range(30)))
    async with channel_to(cluster.target("node-0"), secure.with_token(secure.tenant)) as channel:
        response, nodes = await node_figures(store_pb2_grpc.StoreServiceStub(channel), ())
    assert sorted(nodes) == list(MEMBERS)
    assert (response.server.keys, response.server.memory_bytes) == (0, 0)
    for node in nodes.values():
        assert (node.server.keys, node.server.memory_bytes, node.server.max_memory_bytes) == (0, 0, 0)
        assert (node.server.evictions, node.server.expired_keys) == (0, 0)


async def test_the_health_port_answers_in_plaintext_and_serves_nothing_else(secure: Secure) -> None:
    for member in MEMBERS:
        process = secure.cluster.nodes[member]
        ready = next(line for line in process.log if "nestkv serving on" in line)
        match = _HEALTH_AT.search(ready)
        assert match, ready
        health_address = match[1]
        assert not health_address.endswith(":0")
        assert health_address != process.target
        async with channel_to(health_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "nestkv.v1.StoreService"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            stub = store_pb2_grpc.StoreServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Get(pb.GetRequest(key="k"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Topology(pb.TopologyRequest(), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The store's own port speaks TLS only.
        async with channel_to(process.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


# --- refusals -----------------------------------------------------------------------------------------

_TWO = "node-0=127.0.0.1:1,node-1=127.0.0.1:2"
REFUSALS = {
    "node-not-a-member": (
        ("--node-id", "node-9", "--cluster", _TWO),
        "this node's id 'node-9' (--node-id) is not among the members of --cluster (node-0, node-1)",
    ),
    "no-address": (
        ("--node-id", "node-0", "--cluster", "node-0=nohost"),
        "'node-0=nohost' is not ID=HOST:PORT",
    ),
    "no-id": (
        ("--node-id", "node-0", "--cluster", "node-0=127.0.0.1:1,=127.0.0.1:2"),
        "'=127.0.0.1:2' is not ID=HOST:PORT",
    ),
    "bad-port": (("--node-id", "node-0", "--cluster", "node-0=127.0.0.1:99999"), "is not ID=HOST:PORT"),
    "listed-twice": (
        ("--node-id", "node-0", "--cluster", "node-0=127.0.0.1:1,node-0=127.0.0.1:2"),
        "member 'node-0' is listed twice",
    ),
    "no-members": (("--node-id", "node-0", "--cluster", " , "), "no members"),
}


def refused(*args: str) -> str:
    """Run the server with `args`: it must exit non-zero without serving; its last line of stderr."""
    done = server_command("--port", "0", *args)
    assert done.returncode != 0, done.stderr
    assert "serving on" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_a_member_list_that_cannot_work_stops_the_start(args: tuple[str, ...], message: str) -> None:
    line = refused(*args)
    assert line.startswith("nestkv: ")
    assert message in line


def test_a_missing_member_file_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "members"
    line = refused("--node-id", "node-0", "--cluster", f"@{missing}")
    assert f"--cluster @{missing}" in line
    assert "No such file" in line


def test_a_cluster_with_tokens_needs_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    auth_file = AuthFile(tmp_path / "tokens.toml")
    auth_file.mint("tenant", ["tenant"])
    cluster = ("--node-id", "node-0", "--cluster", "node-0=127.0.0.1:1")
    line = refused(*cluster, "--auth-file", str(auth_file.path))
    assert "a cluster with --auth-file needs mutual TLS (--tls-cert, --tls-key, --tls-client-ca)" in line
    tls = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    line = refused(*cluster, *tls, "--auth-file", str(auth_file.path))
    assert "a cluster served over TLS needs --tls-client-ca" in line
    line = refused(*cluster, *tls)
    assert "a cluster served over TLS needs --tls-client-ca" in line
    mutual = (*tls, "--tls-client-ca", str(pki.ca.cert), "--auth-file", str(auth_file.path))
    # A member id with a dot would name another cluster's node: a.b of c.svc is a of b.c.svc.
    dotted = ("--node-id", "a.b", "--cluster", "a.b=127.0.0.1:1", "--cluster-name", "c.svc")
    line = refused(*dotted, *mutual)
    assert "under mutual TLS every member id must be one lower-case DNS label" in line
    assert "not: a.b" in line
    for name in ("", "Nestkv.Default.svc", "nestkv..svc", "-nestkv.svc"):
        line = refused(*cluster, *mutual, f"--cluster-name={name}")
        assert (
            "a cluster served over TLS needs --cluster-name, a DNS name such as nestkv.NAMESPACE.svc" in line
        )
        assert repr(name) in line


# --- the member file ----------------------------------------------------------------------------------


async def test_the_member_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    with ClusterProcesses(tmp_path, 1, data=False) as cluster:
        process = cluster.nodes["node-0"]
        async with channel_to(cluster.target("node-0")) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            topology: list[pb.TopologyResponse] = []

            async def read() -> pb.TopologyResponse:
                response: pb.TopologyResponse = await stub.Topology(pb.TopologyRequest(), timeout=10)
                topology.append(response)
                return response

            first = await read()
            assert [m.id for m in first.members] == ["node-0"]

            async def version_is_not(version: str, within: float = 10.0) -> pb.TopologyResponse:
                async with asyncio.timeout(within):
                    while (response := await read()).version == version:  # noqa: ASYNC110 - another process
                        await asyncio.sleep(0.1)
                return response

            cluster.add_members(1)
            second = await version_is_not(first.version)
            assert [(m.id, m.address) for m in second.members] == [
                (member, cluster.target(member)) for member in ("node-0", "node-1")
            ]
            assert second.version == topology_version({m: cluster.target(m) for m in ("node-0", "node-1")})
            assert any("members changed" in line for line in process.log)

            cluster.members_file.write_text(
                f"node-0=127.0.0.1:{cluster.ports['node-0']}\nnot a member line\n"
            )
            await eventually(
                lambda: any("kept the previous members" in line for line in process.log), within=10
            )
            kept = next(line for line in process.log if "kept the previous members" in line)
            assert "'not a member line' is not ID=HOST:PORT" in kept
            assert (await read()).version == second.version

            # Still watched: a good file again is taken.
            cluster.write_members(["node-0"])
            assert (await version_is_not(second.version)).version == first.version


@contextlib.asynccontextmanager
async def pausing_node_2(
    tmp_path: Path, path: tuple[str, ...], keys: Sequence[str]
) -> AsyncIterator[tuple[GrpcStore, Callable[[], float]]]:
    """A routing client (10 s deadline) of three nodes with --replicas 2, `keys` written in `path`;
    node-2 is paused as the block begins and resumed as it ends. Yields the namespaced store and
    the seconds since the pause."""
    with ClusterProcesses(tmp_path, 3, "--replicas", "2", data=False) as cluster:
        for node in cluster.nodes.values():
            await node.ready()
        async with GrpcStore.with_client(cluster.target("node-0"), timeout=10) as routing:
            await routed(routing)
            store = in_namespace(routing, path)
            await asyncio.gather(*(store.set(key, b"v") for key in keys))
            paused = cluster.nodes["node-2"].process
            paused.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            try:
                yield store, lambda: time.monotonic() - started
            finally:
                paused.send_signal(signal.SIGCONT)


async def test_a_routing_client_gives_up_a_paused_node_once_another_node_says_it_is_down(
    tmp_path: Path,
) -> None:
    """With replicas, a node's answers name the members it knows not to answer for their keys
    (PipelineResponse.members_down): a routing client whose stream to one has gone silent gives
    it up then and sends its reads to the keys' other copies, rather than wait for their 10 s
    deadline; reads of other keys keep it told meanwhile."""
    path = ("paused",)
    paused_keys = keys_owned_by("node-2", path, 8)
    other_keys = keys_owned_by("node-0", path, 8)
    async with pausing_node_2(tmp_path, path, paused_keys + other_keys) as (store, since):
        reads = asyncio.gather(*(store.get(key) for key in paused_keys))
        while not reads.done():  # the other nodes' answers carry the news
            await asyncio.gather(*(store.get(key) for key in other_keys))
            await asyncio.sleep(0.05)
        took = since()
        assert await reads == [b"v"] * len(paused_keys)
    print(f"first reads of the paused node's keys answered after {took:.2f} s")
    assert took < 5.0  # half the deadline: before it, a silent stream was given up at 10 s


async def test_a_routing_client_whose_operations_all_wait_on_a_paused_node_asks_another_member(
    tmp_path: Path,
) -> None:
    """Nothing goes to the other nodes, so no answer of theirs names the paused node: the client
    asks one (TopologyResponse.members_down) once its stream has been silent for 0.2 s."""
    path = ("paused-only",)
    paused_keys = keys_owned_by("node-2", path, 8)
    async with pausing_node_2(tmp_path, path, paused_keys) as (store, since):
        read = await asyncio.gather(*(store.get(key) for key in paused_keys))
        took = since()
    assert read == [b"v"] * len(paused_keys)
    print(f"reads of the paused node's keys answered after {took:.2f} s")
    assert took < 5.0
