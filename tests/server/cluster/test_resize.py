"""Resizing a cluster under traffic: 3 -> 4 and 4 -> 3 nodes, and a node killed mid-hand-off.

Writers keep writing (each its own keys, one write at a time, so the last
acknowledged value of every key is known) and reading back what was
acknowledged, through a topology-aware client and a client pinned to one
node, while the members change. Every acknowledged value must read back
throughout and after, and at the end each node holds exactly the keys the
placement gives it. NESTKV_SOAK=1 (make soak) runs them ten times larger.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestkv.client import GrpcStore, StoreUnavailableError, channel_options
from nestkv.wire.placement import Placement
from tests.clusterproc import ClusterProcesses
from tests.polling import eventually

SOAK = os.environ.get("NESTKV_SOAK") == "1"
PRELOADED = 20_000 if SOAK else 2_000
WRITERS = 8


class Traffic:
    """Writers on their own keys, each reading back what it wrote; what was acknowledged, and failures."""

    def __init__(self, stores: list[GrpcStore]) -> None:
        self.stores = stores
        self.acknowledged: dict[str, bytes] = {}
        self.failures: list[str] = []
        self.reads = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def preload(self, count: int) -> None:
        items = {f"pre-{n}": f"v0-{n}".encode() for n in range(count)}
        await self.stores[0].with_namespace("data").set_many(items)
        self.acknowledged.update(items)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write(n)) for n in range(WRITERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _write(self, writer: int) -> None:
        store = self.stores[writer % len(self.stores)].with_namespace("data")
        rng = random.Random(writer)
        mine = [f"pre-{n}" for n in range(writer, PRELOADED, WRITERS)]  # preloaded keys it overwrites
        written: list[str] = []
        round_ = 0
        while not self._stop.is_set():
            round_ += 1
            # A new key, and a preloaded one overwritten: both must survive the hand-off.
            for key in (f"w{writer}-{round_}", rng.choice(mine)):
                value = f"v{round_}-{writer}".encode()
                await store.set(key, value)
                self.acknowledged[key] = value
                written.append(key)
            # This writer's own keys read back exactly; any preloaded key is there (others write it).
            for key in (rng.choice(written), rng.choice(written), f"pre-{rng.randrange(PRELOADED)}"):
                got = await store.get(key)
                self.reads += 1
                if got != self.acknowledged[key] and (key in written or got is None):
                    self.failures.append(
                        f"{key}: read {got!r}, acknowledged {self.acknowledged[key]!r} (writer {writer})"
                    )


@asynccontextmanager
async def clients(cluster: ClusterProcesses, pinned_to: str) -> AsyncIterator[list[GrpcStore]]:
    """A topology-aware client (given node-0) and one on a channel of its own to `pinned_to`."""
    channel = grpc.aio.insecure_channel(cluster.target(pinned_to), options=channel_options())
    routing = GrpcStore.with_client(cluster.target("node-0"), timeout=10)
    try:
        yield [routing, GrpcStore(channel, timeout=10)]
    finally:
        await routing.close()
        await channel.close()


async def settled(store: GrpcStore, members: list[str], keys: list[str]) -> None:
    """Wait until each of `members` holds exactly the keys of ["data"] the placement gives it."""
    placement = Placement(members)
    expected = dict.fromkeys(members, 0)
    for key in keys:
        expected[placement.owner(["data"], key)] += 1
    counts: dict[str, int] = {}
    async with asyncio.timeout(30):
        while counts != expected:
            try:
                stats = await store.with_namespace("data").stats()
            except StoreUnavailableError:  # a node still lists a member that has left, for a moment
                await asyncio.sleep(0.1)
                continue
            counts = {node: figures.namespace.keys for node, figures in stats.nodes.items()}
            await asyncio.sleep(0.1)


async def check_every_key(store: GrpcStore, acknowledged: dict[str, bytes]) -> None:
    keys = sorted(acknowledged)
    values = await store.with_namespace("data").get_many(keys)
    wrong = [(key, value) for key, value in zip(keys, values, strict=True) if value != acknowledged[key]]
    assert not wrong, f"{len(wrong)} of {len(keys)} keys lost or stale, e.g. {wrong[:5]}"


async def resize_under_traffic(tmp_path: Path, grow: bool) -> None:
    with ClusterProcesses(tmp_path, 3 if grow else 4, "--fsync", "everysec") as cluster:
        async with clients(cluster, "node-1") as stores:
            traffic = Traffic(stores)
            await traffic.preload(PRELOADED)
            traffic.start()
            await asyncio.sleep(0.5)
            if grow:
                (new,) = cluster.add_members(1, listed=False)
                # The new node starts with the new list; the others read it a moment later, as
                # Kubernetes' ConfigMap reaches pods at different times.
                own_list = tmp_path / "members-of-new-node"
                cluster.write_members(list(cluster.ports), own_list)
                cluster.nodes[new] = cluster.node(new, members_file=own_list).start()
                cluster.write_members(list(cluster.ports))
                members = list(cluster.ports)
            else:
                members = ["node-0", "node-1", "node-2"]
                cluster.write_members(members)
            await asyncio.sleep(3)  # traffic across the change and the hand-off
            await traffic.stop()
            if not grow:
                # Removed from the list: it hands everything off, then SIGTERM finds nothing left.
                assert cluster.nodes["node-3"].stop(signal.SIGTERM) == 0
            assert not traffic.failures, traffic.failures[:10]
            assert traffic.reads > 100
            await settled(stores[0], members, list(traffic.acknowledged))
            # The topology-aware client was told its list was stale and read the new one.
            router = stores[0]._connection._opened()[3]
            assert router is not None
            assert set(router.members) == set(members)
            await check_every_key(stores[0], traffic.acknowledged)
            await check_every_key(stores[1], traffic.acknowledged)


async def test_growing_from_3_to_4_nodes_under_traffic_loses_and_hides_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    await resize_under_traffic(tmp_path, grow=True)


async def test_shrinking_from_4_to_3_nodes_under_traffic_loses_and_hides_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    await resize_under_traffic(tmp_path, grow=False)


@pytest.mark.parametrize("fsync", ["always", "everysec"])
@pytest.mark.parametrize("killed", ["sender", "receiver"])
async def test_a_node_killed_in_the_middle_of_a_hand_off_loses_no_acknowledged_key(
    tmp_path: Path, fsync: str, killed: str
) -> None:
    # node-0 and node-1 send keys to node-2 (added); one side is killed while they travel, and
    # restarted on its data directory. A sender drops a key only once the receiver has it; the
    # receiver answers once the keys are in its log as --fsync says (a killed process keeps what
    # it wrote to the log; --fsync always also what a machine crash would take).
    keys = 20 * PRELOADED
    with ClusterProcesses(tmp_path, 2, "--fsync", fsync) as cluster:
        async with clients(cluster, "node-1") as stores:
            items = {f"k{n}": f"v{n}".encode() for n in range(keys)}
            await stores[0].with_namespace("data").set_many(items)
            (receiver,) = cluster.add_members(1, listed=False)
            own_list = tmp_path / "members-of-new-node"
            cluster.write_members(list(cluster.ports), own_list)
            cluster.nodes[receiver] = cluster.node(receiver, members_file=own_list).start()
            sender = cluster.nodes["node-0"]
            if killed == "sender":
                # A receiver that does not answer holds the sender mid-hand-off, for certain.
                cluster.nodes[receiver].process.send_signal(signal.SIGSTOP)
            cluster.write_members(list(cluster.ports))
            await eventually(lambda: any("handing off" in line for line in sender.log), interval=0.002)
            if killed == "sender":
                await asyncio.sleep(0.5)  # all it does before the receiver answers, done
            victim = "node-0" if killed == "sender" else receiver
            assert cluster.nodes[victim].stop(signal.SIGKILL) == -signal.SIGKILL
            assert not any("hand-off of version" in line for line in sender.log), "killed too late"
            if killed == "sender":
                cluster.nodes[receiver].process.send_signal(signal.SIGCONT)
            restart_list = own_list if victim == receiver else None
            cluster.nodes[victim] = cluster.node(victim, members_file=restart_list).start()
            await settled(stores[0], list(cluster.ports), list(items))
            await check_every_key(stores[0], items)
            await check_every_key(stores[1], items)


async def test_sigterm_on_a_node_taken_off_the_list_hands_its_keys_off_before_it_exits(
    tmp_path: Path,
) -> None:
    # SIGTERM comes before the node has polled its member file: it reads the list, finds itself
    # off it, and hands every key off before it stops serving.
    with ClusterProcesses(tmp_path, 3) as cluster:
        async with clients(cluster, "node-0") as stores:
            items = {f"k{n}": f"v{n}".encode() for n in range(PRELOADED)}
            await stores[1].with_namespace("data").set_many(items)
            leaving = cluster.nodes["node-2"]
            cluster.write_members(["node-0", "node-1"])
            assert leaving.stop(signal.SIGTERM) == 0
            assert any("drain done" in line for line in leaving.log), leaving.log[-5:]
            await settled(stores[1], ["node-0", "node-1"], list(items))
            await check_every_key(stores[1], items)


async def test_a_drain_that_cannot_finish_ends_after_drain_timeout_and_keeps_the_keys_on_disk(
    tmp_path: Path,
) -> None:
    with ClusterProcesses(tmp_path, 2) as cluster:
        async with clients(cluster, "node-0") as stores:
            items = {f"k{n}": f"v{n}".encode() for n in range(200)}
            await stores[1].with_namespace("data").set_many(items)
        leaving = cluster.nodes["node-1"]
        leaving.stop(signal.SIGTERM)  # restarted below with a short drain
        cluster.nodes["node-1"] = leaving = cluster.node("node-1", "--drain-timeout", "1").start()
        cluster.nodes["node-0"].process.send_signal(signal.SIGSTOP)  # the only place keys could go
        try:
            cluster.write_members(["node-0"])
            started = asyncio.get_running_loop().time()
            assert leaving.stop(signal.SIGTERM) == 0
            assert asyncio.get_running_loop().time() - started < 10
        finally:
            cluster.nodes["node-0"].process.send_signal(signal.SIGCONT)
        assert any("drain timed out after 1s" in line for line in leaving.log), leaving.log[-5:]
        assert any("snapshot of" in line for line in leaving.log)  # its keys stay on its disk


async def test_a_node_whose_member_file_lags_takes_the_new_list_from_a_peer_and_loses_no_write(
    tmp_path: Path,
) -> None:
    # Each node reads its own file, as pods each get a ConfigMap's update up to a minute apart:
    # node-0's never changes here. It hears of the new list from the nodes that read theirs,
    # takes it from them (their list before is its own), and stops taking writes for keys the
    # new node owns: the last acknowledged write of a key wins wherever it was sent.
    cluster = ClusterProcesses(tmp_path, 3)
    files = {member: tmp_path / f"members-of-{member}" for member in ("node-0", "node-1", "node-2", "node-3")}
    try:
        for member in ("node-0", "node-1", "node-2"):
            cluster.write_members(["node-0", "node-1", "node-2"], files[member])
            cluster.nodes[member] = cluster.node(member, members_file=files[member]).start()
        (new,) = cluster.add_members(1, listed=False)
        everyone = list(cluster.ports)
        cluster.write_members(everyone, files[new])
        cluster.nodes[new] = cluster.node(new, members_file=files[new]).start()
        moving = [
            key for n in range(400) if Placement(everyone[:3]).owner(["data"], key := f"k{n}") == "node-0"
        ]
        moving = [key for key in moving if Placement(everyone).owner(["data"], key) == new]
        assert moving
        for member in ("node-1", "node-2"):
            cluster.write_members(everyone, files[member])
        async with (
            GrpcStore.with_client(cluster.target("node-1")) as through_new,
            clients(cluster, "node-0") as (_, through_lagging),
        ):
            await eventually(
                lambda: any("one change ahead" in line for line in cluster.nodes["node-0"].log), within=15
            )
            for round_ in range(3):
                for key in moving:
                    await through_new.with_namespace("data").set(key, f"new-{round_}")
                    await through_lagging.with_namespace("data").set(key, f"lagging-{round_}")
            await asyncio.sleep(1.5)  # any hand-off under way is over
            values = await through_new.with_namespace("data").get_many(moving)
            assert values == [b"lagging-2"] * len(moving)
            stats = await through_new.with_namespace("data").stats()
            assert stats.nodes[new].namespace.keys == len(moving)
            assert stats.nodes["node-0"].namespace.keys == 0
    finally:
        cluster.stop()


async def test_a_node_added_is_not_ready_for_clients_until_a_member_takes_its_list(tmp_path: Path) -> None:
    # Until then the others may still take writes for the keys it owns: the client Service
    # must not send it any (Kubernetes' readiness probe asks grpc.health.v1 for StoreService).
    with ClusterProcesses(tmp_path, 2) as cluster:
        (new,) = cluster.add_members(1, listed=False)
        own_list = tmp_path / "members-of-new-node"
        cluster.write_members(list(cluster.ports), own_list)
        cluster.nodes[new] = cluster.node(new, members_file=own_list).start()
        async with grpc.aio.insecure_channel(cluster.target(new)) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return int(response.status)

            await asyncio.sleep(1.5)  # its hand-offs are refused: the others do not know it
            assert await status("") == health_pb2.HealthCheckResponse.SERVING
            assert await status("nestkv.v1.StoreService") == health_pb2.HealthCheckResponse.NOT_SERVING
            cluster.write_members(list(cluster.ports))
            watch = health.Watch(health_pb2.HealthCheckRequest(service="nestkv.v1.StoreService"), timeout=15)
            async for update in watch:  # the status now, then each change
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    break
        for member in ("node-0", "node-1"):  # they are ready from the start: each knew the other
            assert any("StoreService ready" in line for line in cluster.nodes[member].log)
