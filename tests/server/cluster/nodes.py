"""An in-process cluster: real nodes (Cluster, ClusterRouter, BatchRunner, storage), fake connections.

Each node is built as nestkv.server.app builds one; only `Peers` is replaced: a
call to a member's address runs on that member's own BatchRunner, in the same
event loop, under the PeerGrant its admission would give. A member in `down`
answers nothing: its calls fail as a peer stream that cannot connect fails.
Admission and the wire are tested on real processes (tests/server/cluster/test_cluster.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from nestkv.server.batches import BatchRunner
from nestkv.server.cluster import Cluster, ClusterRouter, Membership, PeerGrant, Peers, Topology
from nestkv.server.cluster.peers import PEER_TIMEOUT, REPLICA_TIMEOUT
from nestkv.server.limits import Limits
from nestkv.server.metrics import OperationMetrics
from nestkv.server.operations import Operations
from nestkv.server.security import Gate
from nestkv.server.storage import NamespacedStorage
from nestkv.server.storage.clock import HybridClock
from nestkv.server.storage.persistence import Persistence
from nestkv.server.storage.tombstones import Tombstones
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.errors import StoreTimeoutError, StoreUnavailableError

LIMITS = Limits()


def address_of(member: str) -> str:
    return f"{member}.test:50051"


def spec(members: list[str]) -> str:
    """A --cluster value naming `members`."""
    return ",".join(f"{member}={address_of(member)}" for member in members)


class Wall:
    """The nodes' wall clock: one millisecond passes at each reading, so that of two changes made
    one after the other, on any nodes, the later has the later version (as with clocks in sync and
    changes a millisecond apart or more: closer than their offset, the tie-break decides)."""

    def __init__(self) -> None:
        self._readings = itertools.count()

    def __call__(self) -> float:
        return 1_800_000_000.0 + next(self._readings) / 1000


class InProcessCluster:
    """Nodes by id, and which of them are down."""

    def __init__(self, members: list[str], replicas: int = 1, min_copies: int = 0) -> None:
        """`replicas` and `min_copies` (0: min(replicas, 2)) as the flags."""
        self.wall = Wall()
        self.replicas = replicas
        self.min_copies = min_copies or min(replicas, 2)
        self.nodes: dict[str, Node] = {}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()
        """Pairs of members cut from each other only (a partial partition): each reaches the rest."""
        self.delays: dict[str, float] = {}
        """Seconds a call to a member takes to reach it (default 0: a turn of the loop)."""
        for member in members:
            self.nodes[member] = Node(member, spec(members), self)

    def by_address(self, address: str, caller: str = "") -> Node:
        member = address.split(".")[0]
        cut = frozenset((caller, member)) in self.cut
        # A node down is called by no one, and calls no one.
        if member in self.down or caller in self.down or member not in self.nodes or cut:
            raise StoreUnavailableError(  # as a peer pipeline whose stream never reached the node
                f"UNAVAILABLE: failed to connect to {address}",
                "UNAVAILABLE",
                reason="UNREACHABLE",
                applied=False,
            )
        return self.nodes[member]

    def add(self, member: str, data_dir: Path | None = None) -> Node:
        """A new member, started with the list that names it; the others still have theirs."""
        members = [*self.nodes, member]
        node = self.nodes[member] = Node(member, spec(members), self, data_dir)
        return node

    async def stop(self, member: str) -> None:
        """Stop a member: it answers nothing, and its data directory is closed."""
        node = self.nodes[member]
        self.down.add(member)
        await node.close()

    def restart(self, member: str, members: list[str]) -> Node:
        """Start a stopped member again on its data directory, with the list `members`."""
        old = self.nodes[member]
        node = self.nodes[member] = Node(member, spec(members), self, old.data_dir)
        self.down.discard(member)
        return node

    def change(self, members: list[str], *, on: list[str] | None = None) -> None:
        """Give the nodes `on` (default: all) the member list `members`."""
        topology = Topology({member: address_of(member) for member in members}, self.replicas)
        for member in on or list(self.nodes):
            self.nodes[member].membership.change(topology, "the test")

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close()


class FakePeers(Peers):
    """A node's connections to the others, as calls into their runners."""

    def __init__(self, node_id: str, cluster: InProcessCluster, version: Callable[[], str]) -> None:
        super().__init__(node_id, None, LIMITS.max_value_bytes, version)
        self._node_id = node_id
        self._cluster = cluster
        self._version = version

    def forward(
        self, address: str, operation: pb.Operation, mode: str = "", deadline: float = 0.0
    ) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self._forward(address, operation, mode))

    async def _forward(self, address: str, operation: pb.Operation, mode: str) -> pb.OperationResult:
        timeout = REPLICA_TIMEOUT if mode == "replica" else PEER_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                return await self._run(address, operation, mode)
        except TimeoutError:
            raise StoreTimeoutError("DEADLINE_EXCEEDED: no answer", "DEADLINE_EXCEEDED") from None

    async def _run(self, address: str, operation: pb.Operation, mode: str) -> pb.OperationResult:
        await asyncio.sleep(self._cluster.delays.get(address.split(".")[0], 0))  # a turn of the loop at least
        node = self._cluster.by_address(address, self._node_id)
        batch = pb.PipelineRequest(operations=[operation], topology_version=self._version())
        grant = PeerGrant(self._node_id, mode, LIMITS)
        responses, _ = await node.runner.run_all(batch, grant)
        [result] = responses[0].results
        return result

    async def stats(self, address: str, request: pb.StatsRequest) -> pb.StatsResponse:
        response = pb.StatsResponse()
        self._cluster.by_address(address, self._node_id).operations.stats(request, response)
        return response

    async def ping(self, address: str, seconds: float) -> peer_pb.PingResponse:
        await asyncio.sleep(0)
        return self._cluster.by_address(address, self._node_id).cluster.answer_ping(self._node_id)

    async def catch_up(self, address: str, topology_version: str) -> AsyncIterator[peer_pb.HandOffRequest]:
        node = self._cluster.by_address(address, self._node_id)
        async for message in node.cluster.catch_up_for(self._node_id, topology_version):
            yield message

    async def topology(self, address: str) -> pb.TopologyResponse:
        response = pb.TopologyResponse()
        self._cluster.by_address(address, self._node_id).router.describe(response)
        return response

    def hand_off(self, address: str) -> Callable[[Any], Awaitable[peer_pb.HandOffResponse]]:
        async def call(requests: AsyncIterable[peer_pb.HandOffRequest]) -> peer_pb.HandOffResponse:
            node = self._cluster.by_address(address, self._node_id)
            response = peer_pb.HandOffResponse()
            async for request in requests:
                stored, skipped = node.cluster.take(self._node_id, request)
                response.stored += stored
                response.skipped += skipped
            response.passed_version = node.cluster.handoff.passed_version
            return response

        return call


class Node:
    """One member: its storage, cluster, router and runner, as the server wires them."""

    def __init__(
        self, node_id: str, members: str, cluster: InProcessCluster, data_dir: Path | None = None
    ) -> None:
        self.storage = NamespacedStorage(
            versions=HybridClock(node_id, cluster.wall), tombstones=Tombstones(3600, 100_000)
        )
        self.data_dir = data_dir
        self.persistence = None
        if data_dir is not None:
            self.persistence = Persistence.open(data_dir, "always", wall=cluster.wall)
            self.persistence.recover(self.storage)
        commit = self.persistence.commit if self.persistence else _nothing
        self.membership = Membership(node_id, members, cluster.replicas)
        self.peers = FakePeers(node_id, cluster, lambda: self.membership.current.version)
        gate = Gate("", LIMITS)
        self.everything = gate.everything
        self.cluster = Cluster(
            self.membership,
            self.peers,
            gate,
            self.storage,
            commit=commit,
            writable=_nothing,
            peer_domain=None,
            min_copies=cluster.min_copies,
        )
        self.operations = Operations(self.storage, LIMITS)
        self.metrics = OperationMetrics()
        self.router = ClusterRouter(self.cluster, self.operations, self.metrics)
        self.runner = BatchRunner(self.operations, self.router, commit=commit, metrics=self.metrics)
        self.tasks: list[asyncio.Task[None]] = []

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        if self.persistence is not None:
            self.persistence.close()
            self.persistence = None

    def start_hand_offs(self) -> None:
        """Run this node's hand-off passes in the background, as the server does."""
        self.tasks.append(asyncio.get_running_loop().create_task(self.cluster.handoff.run_forever()))

    def start_replication(self) -> None:
        """Run this node's hand-offs, pings and catch-ups in the background, as the server does
        with --replicas 2 or more."""
        replication = self.cluster.replication
        assert replication is not None
        self.start_hand_offs()
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(replication.liveness.ping_forever()))
        self.tasks.append(loop.create_task(replication.catch_up_forever()))

    @property
    def current(self) -> bool:
        """Whether this node answers for its keys (with replicas)."""
        replication = self.cluster.replication
        assert replication is not None
        return replication.liveness.current

    def sees_up(self, member: str) -> bool:
        replication = self.cluster.replication
        assert replication is not None
        return replication.liveness.up(member)

    def sees_serving(self, member: str) -> bool:
        replication = self.cluster.replication
        assert replication is not None
        return replication.liveness.serving(member)

    async def call(
        self, *operations: pb.Operation, version: str = "", deadline_unix_ms: int = 0
    ) -> list[pb.OperationResult]:
        """Run `operations` as a client's batch sent here (routed by the list of `version`)."""
        batch = pb.PipelineRequest(
            id=1, operations=operations, topology_version=version, deadline_unix_ms=deadline_unix_ms
        )
        responses, _ = await self.runner.run_all(batch, self.everything)
        return [result for response in responses for result in response.results]

    async def set(self, key: str, value: bytes, path: tuple[str, ...] = ("ns",)) -> pb.OperationResult:
        [result] = await self.call(pb.Operation(set=pb.SetRequest(path=path, key=key, value=value)))
        return result

    async def get(self, key: str, path: tuple[str, ...] = ("ns",)) -> pb.OperationResult:
        [result] = await self.call(pb.Operation(get=pb.GetRequest(path=path, key=key)))
        return result

    async def delete_result(self, key: str, path: tuple[str, ...] = ("ns",)) -> pb.OperationResult:
        [result] = await self.call(pb.Operation(delete=pb.DeleteRequest(path=path, key=key)))
        return result

    def holds(self, key: str, path: tuple[str, ...] = ("ns",)) -> bool:
        return self.storage.exists(path, key)


def keys_owned_by(owner: str, topology: Topology, count: int, path: tuple[str, ...] = ("ns",)) -> list[str]:
    """`count` keys that `topology` gives to `owner`."""
    keys = []
    for number in range(100_000):
        key = f"key-{number}"
        if topology.owner(path, key) == owner:
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError(f"fewer than {count} keys of {owner}")


def _nothing() -> None:
    pass
