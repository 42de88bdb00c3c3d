"""Replicas in process (--replicas 2), against fake peers (tests/server/cluster/nodes.py): a write
reaches two copies before it is answered, a copy down is stood in for and caught up when back.

The nodes ping each other for real (every 0.1 s), so each test waits on what it needs to see."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from nestkv.server.cluster import PeerGrant
from nestkv.server.cluster.liveness import DOWN_AFTER, INTERVAL, LEASE
from nestkv.server.errors import NoServingCopy, NotServing
from nestkv.v1 import store_pb2 as pb
from tests.errorfields import fields_of, info_of
from tests.server.cluster.nodes import LIMITS, InProcessCluster, Node, address_of

PATH = ("ns",)


@pytest.fixture
async def three() -> AsyncIterator[InProcessCluster]:
    cluster = InProcessCluster(["a", "b", "c"], replicas=2)
    for node in cluster.nodes.values():
        node.start_replication()
    await until(lambda: all(node.sees_serving(other) for node in cluster.nodes.values() for other in "abc"))
    yield cluster
    await cluster.close()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 (what it waits on sets no event)
            await asyncio.sleep(0.02)


def key_with_copies(cluster: InProcessCluster, first: str, second: str, copies: int = 2) -> str:
    """A key whose copies are `first`, then `second` (then the rest)."""
    topology = cluster.nodes[first].membership.current
    for number in range(10_000):
        key = f"key-{number}"
        if topology.copies(PATH, key)[:2] == [first, second]:
            return key
    raise AssertionError("no such key")


def error_of(result: pb.OperationResult) -> tuple[str, str, str]:
    """The status code, reason and applied of an error result, by name: what a program acts on."""
    assert result.WhichOneof("result") == "error", result
    return fields_of(result.error)


def node_named(result: pb.OperationResult) -> str:
    """The node an error result's ErrorInfo names."""
    return str(info_of(result.error.details).metadata["node"])


async def test_a_write_is_on_both_copies_when_it_is_answered(three: InProcessCluster) -> None:
    key = key_with_copies(three, "a", "b")
    result = await three.nodes["c"].set(key, b"v1")  # c keeps no copy: it forwards to a
    assert result.WhichOneof("result") == "set"
    assert [three.nodes[member].holds(key) for member in "abc"] == [True, True, False]
    assert (await three.nodes["c"].delete_result(key)).WhichOneof("result") == "delete"
    assert [three.nodes[member].holds(key) for member in "abc"] == [False, False, False]


async def test_a_write_waits_for_its_second_copy_however_slow(three: InProcessCluster) -> None:
    key = key_with_copies(three, "a", "b")
    three.delays["b"] = 0.3
    result = await three.nodes["a"].set(key, b"v1")
    assert result.WhichOneof("result") == "set"
    assert three.nodes["b"].storage.get(PATH, key) == b"v1"


async def test_a_copy_that_does_not_store_a_replica_in_time_is_replaced_by_a_stand_in(
    three: InProcessCluster,
) -> None:
    key = key_with_copies(three, "a", "b")
    three.delays["b"] = 60  # paused: nothing it is sent arrives
    result = await three.nodes["a"].set(key, b"v1")
    assert result.WhichOneof("result") == "set"
    assert three.nodes["c"].storage.get(PATH, key) == b"v1"  # the stand-in for b
    assert not three.nodes["b"].holds(key)


async def test_the_keys_of_a_node_down_are_read_and_written_on_their_other_copy(
    three: InProcessCluster,
) -> None:
    key = key_with_copies(three, "a", "b")
    await three.nodes["c"].set(key, b"before")
    await three.stop("a")
    c = three.nodes["c"]
    await until(lambda: not c.sees_up("a"))
    await until(lambda: not three.nodes["b"].sees_up("a"))
    assert (await c.get(key)).get.value == b"before"  # from b, the first copy serving
    assert (await c.set(key, b"while a is down")).WhichOneof("result") == "set"
    # b holds it, and c stands in for a.
    assert three.nodes["b"].storage.get(PATH, key) == b"while a is down"
    assert c.storage.get(PATH, key) == b"while a is down"
    roles = {}
    for member in "bc":
        replication = three.nodes[member].cluster.replication
        assert replication is not None
        await replication.count_roles()
        roles[member] = replication.roles
    assert roles["b"] == {"first_copy": 0, "replica": 1, "held_for_others": 0}
    assert roles["c"] == {"first_copy": 0, "replica": 0, "held_for_others": 1}


async def test_a_copy_back_catches_up_before_it_answers_and_the_stand_in_hands_back(
    three: InProcessCluster,
) -> None:
    key = key_with_copies(three, "a", "b")
    await three.stop("a")
    b, c = three.nodes["b"], three.nodes["c"]
    await until(lambda: not c.sees_up("a"))
    await until(lambda: not b.sees_up("a"))
    await c.set(key, b"written while a was down")
    assert c.holds(key)  # as a's stand-in
    a = three.restart("a", ["a", "b", "c"])  # its memory is gone: a restart without a data directory
    assert not a.current
    a.start_replication()
    await until(lambda: a.current)
    assert a.storage.get(PATH, key) == b"written while a was down"
    assert (await a.get(key)).get.value == b"written while a was down"
    await until(lambda: not c.holds(key))  # handed back: c keeps no copy of it


async def test_copies_converge_both_ways_a_copy_back_gives_what_only_it_kept(
    three: InProcessCluster,
) -> None:
    """a and b hold a write; b is cut off, and a loses what it had (a crash that cost its log's
    tail); a comes back and catches up from c alone. When b is back, what only b kept reaches a."""
    key = key_with_copies(three, "a", "b")
    assert (await three.nodes["a"].set(key, b"newer")).WhichOneof("result") == "set"
    assert three.nodes["b"].storage.get(PATH, key) == b"newer"
    three.down.add("b")  # cut off: nothing reaches it (it hears that nobody sees it)
    c = three.nodes["c"]
    await until(lambda: not c.sees_up("b"))
    await three.stop("a")
    a = three.restart("a", ["a", "b", "c"])  # its memory is gone
    a.start_replication()
    await until(lambda: a.current)
    assert a.storage.get(PATH, key) is None  # only b holds it now, and b is away
    three.down.discard("b")
    b = three.nodes["b"]
    await until(lambda: b.current and a.sees_serving("b"))
    assert a.storage.get(PATH, key) == b"newer"
    assert (await c.get(key)).get.value == b"newer"


async def test_a_copy_back_answers_for_its_keys_only_once_the_other_copy_has_stopped(
    three: InProcessCluster,
) -> None:
    """a comes back after b answered for a's keys: at no moment do both take themselves to be the
    copy that answers for a key (a node's increments would count from a state the other changed)."""
    key = key_with_copies(three, "a", "b")
    b = three.nodes["b"]
    replication = b.cluster.replication
    assert replication is not None
    await three.stop("a")
    await until(lambda: replication.serving_copy(PATH, key) == "b")
    both: list[float] = []
    watching = True

    async def watch(a: Node) -> None:
        while watching:  # every turn of the loop: what the two nodes would do with an operation now
            if a.current and replication.serving_copy(PATH, key) == "b":
                both.append(time.monotonic())
            await asyncio.sleep(0)

    a = three.restart("a", ["a", "b", "c"])
    watcher = asyncio.ensure_future(watch(a))
    a.start_replication()
    try:
        await until(lambda: a.current and replication.serving_copy(PATH, key) == "a")
        await asyncio.sleep(0.3)
    finally:
        watching = False
        await watcher
    assert not both, f"both answered for the key for {both[-1] - both[0]:.3f} s"


async def test_an_atomic_operation_sent_to_a_copy_that_no_longer_answers_is_refused_not_applied(
    three: InProcessCluster,
) -> None:
    key = key_with_copies(three, "a", "b")
    increment = pb.Operation(increment=pb.IncrementRequest(path=PATH, key=key, amount=1))
    plain = pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"7"))
    batch = pb.PipelineRequest(operations=[increment, plain])
    # c took b to answer for the key (it had not heard that a is back): b refuses the increment.
    responses, _ = await three.nodes["b"].runner.run_all(batch, PeerGrant("c", "", LIMITS))
    refused, written = responses[0].results
    assert error_of(refused) == ("UNAVAILABLE", "ERROR_REASON_NOT_SERVING", "APPLIED_NOT_APPLIED")
    assert node_named(refused) == "b"  # the node that refused
    assert written.WhichOneof("result") == "set"  # a plain write is merged by version: it runs
    assert three.nodes["a"].storage.get(PATH, key) == b"7"


async def test_a_write_with_fewer_nodes_up_than_it_needs_fails_and_is_applied_nowhere() -> None:
    cluster = InProcessCluster(["a", "b", "c"], replicas=3, min_copies=3)
    try:
        for node in cluster.nodes.values():
            node.start_replication()
        a, b = cluster.nodes["a"], cluster.nodes["b"]
        await until(lambda: a.sees_serving("b") and b.sees_serving("a") and a.current)
        await cluster.stop("c")
        await until(lambda: not a.sees_up("c"))
        key = key_with_copies(cluster, "a", "b", copies=3)
        refused = await b.set(key, b"nowhere")
        assert error_of(refused) == ("UNAVAILABLE", "ERROR_REASON_TOO_FEW_COPIES", "APPLIED_NOT_APPLIED")
        assert [a.holds(key), b.holds(key)] == [False, False]
    finally:
        await cluster.close()


async def test_a_node_out_of_touch_with_the_others_answers_for_nothing(three: InProcessCluster) -> None:
    key = key_with_copies(three, "a", "b")
    await three.nodes["a"].set(key, b"v")
    await three.stop("b")
    await three.stop("c")
    a = three.nodes["a"]
    await until(lambda: not a.current)  # alone: its lease lapsed (it cannot know it is current)
    # It forwards to b (which it has not heard from since: it may be serving), which is down.
    assert error_of(await a.get(key))[0] == "UNAVAILABLE"
    code, reason, applied = error_of(await a.set(key, b"while alone"))
    assert (code, reason, applied) == ("UNAVAILABLE", "ERROR_REASON_UNREACHABLE", "APPLIED_NOT_APPLIED")
    assert a.storage.get(PATH, key) == b"v"


async def test_an_operation_forwarded_to_a_copy_that_is_stopping_is_refused_not_applied(
    three: InProcessCluster,
) -> None:
    key = key_with_copies(three, "a", "b")
    replication = three.nodes["a"].cluster.replication
    assert replication is not None
    replication.liveness.leaving = True  # a steps down; c has not heard yet
    operation = pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"late"))
    result = await three.nodes["c"].peers.forward(address_of("a"), operation)
    assert error_of(result) == ("UNAVAILABLE", "ERROR_REASON_NOT_SERVING", "APPLIED_NOT_APPLIED")
    assert node_named(result) == "a"
    assert not three.nodes["a"].holds(key)


async def test_writes_forwarded_to_a_node_stepping_down_all_succeed(three: InProcessCluster) -> None:
    # A rolling restart under a client pinned to c: c forwards the key's writes to a, its first
    # copy, as a steps down. a tells the others it is not current before it refuses anything,
    # so c's writes go to b from then on, and none fails.
    key = key_with_copies(three, "a", "b")
    replication = three.nodes["a"].cluster.replication
    assert replication is not None
    stepping = asyncio.create_task(replication.step_down(lambda: None))
    results: list[pb.OperationResult] = []
    while not stepping.done():
        results.append(await three.nodes["c"].set(key, f"v{len(results)}".encode()))
        await asyncio.sleep(0.005)
    assert replication.liveness.leaving
    assert len(results) > 20
    assert [result.WhichOneof("result") for result in results] == ["set"] * len(results)
    assert three.nodes["b"].storage.get(PATH, key) == f"v{len(results) - 1}".encode()


async def test_a_caller_cannot_send_a_replica(three: InProcessCluster) -> None:
    key = key_with_copies(three, "a", "b")
    replica = pb.ReplicaRequest(path=PATH, key=key, value=b"forged", version=b"\xff" * 16)
    [result] = await three.nodes["a"].call(pb.Operation(replica=replica))
    assert error_of(result) == ("PERMISSION_DENIED", "ERROR_REASON_NODES_ONLY", "APPLIED_NOT_APPLIED")
    assert not three.nodes["a"].holds(key)


async def test_adding_a_member_moves_copies_so_each_key_ends_on_exactly_its_copies(
    three: InProcessCluster,
) -> None:
    keys = [f"key-{number}" for number in range(200)]
    for key in keys:
        assert (await three.nodes["a"].set(key, key.encode())).WhichOneof("result") == "set"
    d = three.add("d")
    d.start_replication()
    three.change(["a", "b", "c", "d"])
    topology = d.membership.current

    def placed() -> bool:
        return all(
            {member for member, node in three.nodes.items() if node.holds(key)}
            == set(topology.copies(PATH, key))
            for key in keys
        )

    await until(placed, seconds=15)
    for key in keys:
        for member in topology.copies(PATH, key):
            assert three.nodes[member].storage.get(PATH, key) == key.encode()


async def test_removing_a_member_that_is_down_leaves_every_key_on_its_new_copies(
    three: InProcessCluster,
) -> None:
    keys = [f"key-{number}" for number in range(200)]
    for key in keys:
        assert (await three.nodes["a"].set(key, key.encode())).WhichOneof("result") == "set"
    await three.stop("c")  # gone for good: its copies come from the other copy of each key
    three.change(["a", "b"], on=["a", "b"])
    a, b = three.nodes["a"], three.nodes["b"]
    await until(lambda: all(a.holds(key) and b.holds(key) for key in keys), seconds=15)


async def test_a_batch_past_its_caller_s_deadline_is_applied_nowhere(three: InProcessCluster) -> None:
    # A node woken from a pause must not apply what its caller was told had timed out.
    key = key_with_copies(three, "a", "b")
    passed = int((time.time() - 1) * 1000)
    write = pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"late"))
    [result] = await three.nodes["a"].call(write, deadline_unix_ms=passed)
    assert error_of(result) == ("DEADLINE_EXCEEDED", "ERROR_REASON_DEADLINE_EXCEEDED", "APPLIED_NOT_APPLIED")
    assert [three.nodes[member].holds(key) for member in "abc"] == [False, False, False]


async def test_without_replicas_a_late_batch_still_runs_in_its_turn() -> None:
    cluster = InProcessCluster(["a", "b"])
    try:
        write = pb.Operation(set=pb.SetRequest(path=PATH, key="k", value=b"v"))
        [result] = await cluster.nodes["a"].call(write, deadline_unix_ms=int((time.time() - 1) * 1000))
        assert result.WhichOneof("result") == "set"
    finally:
        await cluster.close()


async def test_two_copies_cut_from_each_other_only_never_both_answer_for_a_key(
    three: InProcessCluster,
) -> None:
    """A partial partition: a and b cannot reach each other, c reaches both. Each keeps its lease
    through c, so each keeps answering for its own keys; b answers for none of a's (a holds its
    lease), and refuses an increment of one, not applied, rather than run it as a does."""
    key = key_with_copies(three, "a", "b")
    a, b = three.nodes["a"], three.nodes["b"]
    on_a, on_b = a.cluster.replication, b.cluster.replication
    assert on_a is not None
    assert on_b is not None
    both: list[float] = []
    watching = True

    async def watch() -> None:
        while watching:
            with contextlib.suppress(NoServingCopy, NotServing):
                if on_a.serving_copy(PATH, key) == "a" and on_b.serving_copy(PATH, key) == "b":
                    both.append(time.monotonic())
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    three.cut.add(frozenset("ab"))
    try:
        await until(lambda: not b.sees_up("a") and not a.sees_up("b"))
        await asyncio.sleep(0.5)  # promises, had anyone made them, would have come by now
        assert a.current
        assert b.current
        [refused] = await b.call(pb.Operation(increment=pb.IncrementRequest(path=PATH, key=key, amount=1)))
        assert error_of(refused) == ("UNAVAILABLE", "ERROR_REASON_NOT_SERVING", "APPLIED_NOT_APPLIED")
        assert node_named(refused) == "a"  # the copy that answers for the key
        [counted] = await a.call(pb.Operation(increment=pb.IncrementRequest(path=PATH, key=key, amount=1)))
        assert counted.increment.value == 1
        [through_c] = await three.nodes["c"].call(
            pb.Operation(increment=pb.IncrementRequest(path=PATH, key=key, amount=1))
        )
        assert through_c.increment.value == 2
    finally:
        watching = False
        await watcher
        three.cut.clear()
    assert not both, f"both answered for the key for {both[-1] - both[0]:.3f} s"


async def test_the_next_copy_answers_once_the_others_promise_the_first_holds_no_lease(
    three: InProcessCluster,
) -> None:
    """a stops answering pings: b answers for a's keys once both b and c promise not to grant a
    lease (LEASE after a last asked), not while a's own lease may still hold, and before a is
    taken to be down."""
    key = key_with_copies(three, "a", "b")
    b = three.nodes["b"]
    replication, first = b.cluster.replication, three.nodes["a"].cluster.replication
    assert replication is not None
    assert first is not None
    stopped = time.monotonic()  # a is asked nothing, and asks nothing, from here on
    await three.stop("a")
    both = 0  # times b answered for the key while a's lease still held (a would answer too)

    def b_serves() -> bool:
        nonlocal both
        with contextlib.suppress(NoServingCopy, NotServing):
            if replication.serving_copy(PATH, key) == "b":
                both += first.liveness.in_touch()
                return True
        return False

    await until(b_serves)
    took = time.monotonic() - stopped
    assert both == 0
    assert LEASE / 2 < took < DOWN_AFTER + INTERVAL, took  # (from a's last ask, not from here: LEASE)


async def test_a_copy_written_around_while_cut_from_the_other_copy_catches_up_once_back(
    three: InProcessCluster,
) -> None:
    """A partial partition: b answers for its key and writes its change to c instead of a, which
    kept its lease through c meanwhile. Once a and b reach each other again, b says it wrote
    around a, and a catches up (from c too) before it answers for its keys again."""
    key = key_with_copies(three, "b", "a")
    a, b = three.nodes["a"], three.nodes["b"]
    liveness = a.cluster.replication.liveness  # type: ignore[union-attr]
    three.cut.add(frozenset("ab"))
    await until(lambda: not b.sees_up("a"))
    [written] = await b.call(pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"while cut")))
    assert written.WhichOneof("result") == "set"
    assert three.nodes["c"].holds(key)  # a's stand-in
    assert a.current  # through c
    lapses = liveness.lapses
    three.cut.clear()
    await until(lambda: liveness.lapses > lapses)
    await until(lambda: a.current)
    assert a.storage.get(PATH, key) == b"while cut"
