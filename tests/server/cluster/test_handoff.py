"""HandOff in process, against fake peers (tests/server/cluster/nodes.py): keys follow their owner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nestkv.server.cluster import Topology
from nestkv.server.cluster.handoff import MESSAGE_BYTES
from nestkv.v1 import peer_pb2 as peer_pb
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


async def written_on_a_then_c_joins(
    two: InProcessCluster, count: int, value: bytes = b"older"
) -> tuple[list[str], Node]:
    """`count` keys written on a with `value` that c owns once it joins; then c joins and every node
    has the new list. No pass has run: the keys are still on a."""
    keys = moving_keys(two, count)
    for key in keys:
        await two.nodes["a"].set(key, value)
    c = two.add("c")
    two.change(["a", "b", "c"])
    return keys, c


async def hand_off_everything(cluster: InProcessCluster) -> None:
    """Every node runs its passes until each has handed off what it holds for others."""
    for node in cluster.nodes.values():
        node.start_hand_offs()
    await passed(*cluster.nodes.values())


async def test_keys_move_to_a_new_member_and_leave_their_old_owner(two: InProcessCluster) -> None:
    a = two.nodes["a"]
    for number in range(200):
        await a.set(f"k{number}", b"v%d" % number)
    c = two.add("c")
    two.change(["a", "b", "c"])
    await hand_off_everything(two)
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
    [key], c = await written_on_a_then_c_joins(two, 1, b"old owner's")
    assert not c.holds(key)  # no pass has run: the key is still on a
    assert (await c.get(key)).get.value == b"old owner's"
    exists = await c.call(pb.Operation(exists=pb.ExistsRequest(path=PATH, key=key)))
    assert exists[0].exists.exists


async def test_an_increment_or_condition_at_the_new_owner_starts_from_the_previous_owners_copy(
    two: InProcessCluster,
) -> None:
    (counter, taken), c = await written_on_a_then_c_joins(two, 2, b"41")
    missing = "never-written"
    increment = pb.Operation(increment=pb.IncrementRequest(path=PATH, key=counter, amount=1))
    [counted] = await c.call(increment)
    assert counted.increment.value == 42  # not 1: a still held the counter
    if_absent = pb.SetCondition.SET_CONDITION_IF_ABSENT
    [refused] = await c.call(
        pb.Operation(set=pb.SetRequest(path=PATH, key=taken, value=b"mine", condition=if_absent))
    )
    assert refused.set.stored is False  # a still held the key: it is not absent
    [stored] = await c.call(
        pb.Operation(set=pb.SetRequest(path=PATH, key=missing, value=b"mine", condition=if_absent))
    )
    assert stored.set.stored is True
    await hand_off_everything(two)  # the older copies that arrive now change nothing
    assert [(await c.get(key)).get.value for key in (counter, taken, missing)] == [b"42", b"41", b"mine"]


async def test_a_batch_with_a_conditional_write_during_a_resize_runs_in_its_order(
    two: InProcessCluster,
) -> None:
    [key], c = await written_on_a_then_c_joins(two, 1, b"held")
    if_absent = pb.SetCondition.SET_CONDITION_IF_ABSENT
    refused, overwritten, counted = await c.call(
        pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"mine", condition=if_absent)),
        pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"7")),
        pb.Operation(increment=pb.IncrementRequest(path=PATH, key=key, amount=1)),
    )
    assert refused.set.stored is False  # run first, on a's copy, as the batch orders it
    assert overwritten.set.stored is True
    assert counted.increment.value == 8


async def test_a_conditional_write_whose_previous_owner_does_not_answer_is_not_applied(
    two: InProcessCluster,
) -> None:
    [key], c = await written_on_a_then_c_joins(two, 1, b"41")
    await two.stop("a")  # still a member: its copy may be the only one
    [result] = await c.call(pb.Operation(increment=pb.IncrementRequest(path=PATH, key=key, amount=1)))
    assert result.WhichOneof("result") == "error"
    assert result.error.message == "the key's previous owner did not answer while hand-offs run: not applied"
    assert not c.holds(key)


async def test_a_write_at_the_new_owner_is_not_undone_by_the_older_copy_handed_off(
    two: InProcessCluster,
) -> None:
    a = two.nodes["a"]
    (written, deleted), c = await written_on_a_then_c_joins(two, 2)
    await c.set(written, b"newer")
    await c.call(pb.Operation(delete=pb.DeleteRequest(path=PATH, key=deleted)))
    await hand_off_everything(two)
    assert (await c.get(written)).get.value == b"newer"
    assert not (await c.get(deleted)).get.found
    assert [a.holds(written), a.holds(deleted)] == [False, False]  # a dropped what it handed off


async def test_a_subtree_emptied_at_the_new_owner_is_not_refilled_by_a_hand_off(
    two: InProcessCluster,
) -> None:
    keys, c = await written_on_a_then_c_joins(two, 3)
    await c.call(
        pb.Operation(delete_all=pb.DeleteAllRequest(path=PATH)), version=c.membership.current.version
    )  # c's part of a client's delete_all
    await hand_off_everything(two)
    assert [c.holds(key) for key in keys] == [False, False, False]


# Copies merge by version: what docs/cluster.md promises about resizing.


async def joined_with_c_first(two: InProcessCluster) -> Node:
    """c joins with the new list; a and b still have the old one (they read the change later)."""
    c = two.add("c")
    two.change(["a", "b", "c"], on=["c"])
    return c


async def everyone_read_the_change(cluster: InProcessCluster) -> None:
    cluster.change(["a", "b", "c"], on=["a", "b"])
    await hand_off_everything(cluster)


async def answers(cluster: InProcessCluster, key: str, path: tuple[str, ...] = PATH) -> set[bytes | None]:
    """What each node answers a get of `key` with (None: not found)."""
    found = set()
    for node in cluster.nodes.values():
        result = (await node.get(key, path)).get
        found.add(result.value if result.found else None)
    return found


async def test_a_later_write_through_a_node_on_the_old_list_wins_on_every_node(two: InProcessCluster) -> None:
    a = two.nodes["a"]
    [key] = moving_keys(two, 1)
    c = await joined_with_c_first(two)
    await c.set(key, b"earlier, at the new owner")
    await a.set(key, b"later, at the old owner")  # a's list still gives the key to a
    assert a.holds(key)
    await everyone_read_the_change(two)
    assert await answers(two, key) == {b"later, at the old owner"}
    assert [node.holds(key) for node in two.nodes.values()] == [False, False, True]


async def test_a_later_delete_through_a_node_on_the_old_list_is_not_undone(two: InProcessCluster) -> None:
    a = two.nodes["a"]
    [key] = moving_keys(two, 1)
    c = await joined_with_c_first(two)
    await c.set(key, b"earlier, at the new owner")
    [deleted] = await a.call(pb.Operation(delete=pb.DeleteRequest(path=PATH, key=key)))
    assert deleted.WhichOneof("result") == "delete"
    await everyone_read_the_change(two)
    assert await answers(two, key) == {None}
    assert not c.holds(key)


async def test_a_delete_all_during_a_resize_is_not_undone(two: InProcessCluster) -> None:
    a = two.nodes["a"]
    earlier, later = moving_keys(two, 2)
    c = await joined_with_c_first(two)
    await c.set(earlier, b"before the delete_all")
    # Through a, on the old list: it runs on a and b, not on c, which a does not know of yet.
    [emptied] = await a.call(pb.Operation(delete_all=pb.DeleteAllRequest(path=PATH)))
    assert emptied.WhichOneof("result") == "delete_all"
    assert c.holds(earlier)
    await a.set(later, b"after the delete_all")  # to a: its list gives the key to a
    await everyone_read_the_change(two)
    assert await answers(two, earlier) == {None}
    assert await answers(two, later) == {b"after the delete_all"}


async def test_a_node_restarted_on_an_old_data_directory_ends_with_the_newer_values(tmp_path: Path) -> None:
    cluster = InProcessCluster([])
    try:
        for member in "abc":
            cluster.add(member, tmp_path / member)
        cluster.change(["a", "b", "c"])
        a, c = cluster.nodes["a"], cluster.nodes["c"]
        three = c.membership.current
        keys = keys_owned_by("c", three, 20)
        for key in keys:
            await a.set(key, b"old")
        assert all(c.holds(key) for key in keys)
        await cluster.stop("c")
        cluster.change(["a", "b"], on=["a", "b"])  # c is taken off the list while it is down
        for key in keys:
            await a.set(key, b"new")  # now owned by a or b
        cluster.restart("c", ["a", "b", "c"])  # back on its old data directory, on the list again
        assert cluster.nodes["c"].holds(keys[0])
        await everyone_read_the_change(cluster)
        for key in keys:
            assert await answers(cluster, key) == {b"new"}, key
    finally:
        await cluster.close()


async def test_a_key_deleted_at_the_new_owner_is_not_read_back_from_the_previous_one(
    two: InProcessCluster,
) -> None:
    a = two.nodes["a"]
    (deleted, renewed), c = await written_on_a_then_c_joins(two, 2)  # c asks a on a miss
    await c.call(pb.Operation(delete=pb.DeleteRequest(path=PATH, key=deleted)))
    assert not (await c.get(deleted)).get.found
    assert a.holds(deleted)
    # A miss asked of a is merged at c: c holds the copy from then on, with a's version.
    assert (await c.get(renewed)).get.value == b"older"
    assert c.holds(renewed)


async def test_catch_up_and_hand_off_messages_are_bounded_by_bytes_whatever_they_carry() -> None:
    """Values of 7 MiB, thousands of tombstones and emptied namespaces on long paths: every message
    stays within MESSAGE_BYTES plus one value (a value larger than that goes alone)."""
    cluster = InProcessCluster(["a", "b"], replicas=2)
    try:
        storage = cluster.nodes["a"].storage
        deep = tuple(f"{depth:02d}" + "s" * 254 for depth in range(32))
        for number in range(3):
            storage.set(PATH, f"big{number}", bytes([number]) * (7 * 1024 * 1024))
        for number in range(2_000):
            storage.delete(deep, f"gone{number}" + "k" * 1_000)
            storage.delete_all((*deep[:31], f"empty{number}"))
        messages = [message async for message in cluster.nodes["a"].cluster.handoff.copies_for("b")]
    finally:
        await cluster.close()
    assert [len(entry.value) for message in messages for entry in message.entries] == [7 * 1024 * 1024] * 3
    assert sum(len(message.tombstones) for message in messages) == 2_000
    assert sum(len(message.emptied) for message in messages) == 2_000
    assert max(message.ByteSize() for message in messages if not message.entries) <= 1.1 * MESSAGE_BYTES
    assert max(message.ByteSize() for message in messages) <= 7 * 1024 * 1024 + 64 * 1024


async def test_changes_stamped_by_a_clock_far_ahead_are_left_out_and_the_rest_taken() -> None:
    """A node whose clock says year 3000, or a version of all ones: its replica is refused, its
    hand-off entries left out, and this node's own writes go on with versions of its own time."""
    cluster = InProcessCluster(["a", "b"], replicas=2)
    try:
        b = cluster.nodes["b"]
        now = b.storage.versions.now()
        year_3000 = ((32_503_680_000_000 << 16).to_bytes(8, "big")) + now[8:]
        all_ones = b"\xff" * 16
        for version in (year_3000, all_ones):
            result = b.operations.result_of(
                pb.Operation(replica=pb.ReplicaRequest(path=PATH, key="future", value=b"x", version=version))
            )
            assert result.WhichOneof("result") == "error"
            assert "ahead of this node's clock" in result.error.message
        request = peer_pb.HandOffRequest(topology_version=b.membership.current.version)
        request.entries.add(path=PATH, key="future", value=b"x", version=all_ones)
        request.entries.add(path=PATH, key="present", value=b"y", version=now)
        request.tombstones.add(path=PATH, key="gone", version=year_3000)
        request.emptied.add(path=("emptied",), version=all_ones)
        assert b.cluster.take("a", request) == (1, 2)
        assert b.storage.get(PATH, "future") is None
        assert b.storage.get(PATH, "present") == b"y"
        assert b.storage.tombstones is not None
        assert b.storage.tombstones.over(PATH, "gone") is None
        assert b.storage.tombstones.of_subtree(("emptied",)) is None
        later = b.storage.set(PATH, "later", b"z")  # no OverflowError; a version of this time
        assert abs(b.storage.versions.ahead(later)) < 60
    finally:
        await cluster.close()
