"""HandOff in process, against fake peers (tests/server/cluster/nodes.py): keys follow their owner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nestkv.server.cluster import Topology
from nestkv.v1 import store_pb2 as pb
from tests.server.cluster.nodes import InProcessCluster, Node, address_of, keys_owned_by

PATH = ("ns",)


@pytest.fixture
async def two() -> AsyncIterator[InProcessCluster]:
    cluster = InProcessCluster(["a", "b"])
    yield cluster
    await cluster.close()


async def passed(*nodes: Node) -> None:
    async with asyncio.timeout(10):
        for node in nodes:
            await node.cluster.handoff.passed.wait()


def moving_keys(cluster: InProcessCluster, count: int) -> list[str]:
    """Keys that a owns among a and b, and c among a, b and c."""
    a = cluster.nodes["a"]
    before = a.membership.current
    after = Topology({member: address_of(member) for member in "abc"})
    return [key for key in keys_owned_by("c", after, count * 4) if before.owner(PATH, key) == "a"][:count]


async def test_keys_move_to_a_new_member_and_leave_their_old_owner(two: InProcessCluster) -> None:
    a, b = two.nodes["a"], two.nodes["b"]
    for number in range(200):
        await a.set(f"k{number}", b"v%d" % number)
    c = two.add("c")
    two.change(["a", "b", "c"])
    for node in (a, b, c):
        node.start_hand_offs()
    await passed(a, b, c)
    topology = c.membership.current
    for number in range(200):
        key = f"k{number}"
        owner = topology.owner(PATH, key)
        assert [m for m, node in two.nodes.items() if node.holds(key)] == [owner], key
        assert (await a.get(key)).get.value == b"v%d" % number
    assert c.storage.keys > 0
    assert c.cluster.handoff.known.is_set()  # another member took c's list: c may serve


async def test_a_miss_at_the_new_owner_is_asked_of_the_previous_one_until_the_key_arrives(
    two: InProcessCluster,
) -> None:
    a = two.nodes["a"]
    [key] = moving_keys(two, 1)
    await a.set(key, b"old owner's")
    c = two.add("c")
    two.change(["a", "b", "c"])
    assert not c.holds(key)  # no pass has run: the key is still on a
    assert (await c.get(key)).get.value == b"old owner's"
    exists = await c.call(pb.Operation(exists=pb.ExistsRequest(path=PATH, key=key)))
    assert exists[0].exists.exists


async def test_a_write_at_the_new_owner_is_not_undone_by_the_older_copy_handed_off(
    two: InProcessCluster,
) -> None:
    a = two.nodes["a"]
    written, deleted = moving_keys(two, 2)
    await a.set(written, b"older")
    await a.set(deleted, b"older")
    c = two.add("c")
    two.change(["a", "b", "c"])
    await c.set(written, b"newer")
    await c.call(pb.Operation(delete=pb.DeleteRequest(path=PATH, key=deleted)))
    for node in two.nodes.values():
        node.start_hand_offs()
    await passed(*two.nodes.values())
    assert (await c.get(written)).get.value == b"newer"
    assert not (await c.get(deleted)).get.found
    assert [a.holds(written), a.holds(deleted)] == [False, False]  # a dropped what it handed off


async def test_a_subtree_emptied_at_the_new_owner_is_not_refilled_by_a_hand_off(
    two: InProcessCluster,
) -> None:
    a = two.nodes["a"]
    keys = moving_keys(two, 3)
    for key in keys:
        await a.set(key, b"older")
    c = two.add("c")
    two.change(["a", "b", "c"])
    await c.call(
        pb.Operation(delete_all=pb.DeleteAllRequest(path=PATH)), version=c.membership.current.version
    )  # c's part of a client's delete_all
    for node in two.nodes.values():
        node.start_hand_offs()
    await passed(*two.nodes.values())
    assert [c.holds(key) for key in keys] == [False, False, False]
