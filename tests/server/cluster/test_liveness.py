"""Liveness's promises on a clock the test moves (nestkv.server.cluster.liveness): a member that has
not asked for a lease lately is promised none, and the promise is kept for LEASE."""

from __future__ import annotations

from nestkv.server.cluster.liveness import LEASE, Liveness
from nestkv.v1 import peer_pb2 as peer_pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _no_ping(member: str, address: str) -> peer_pb.PingResponse:
    raise AssertionError("not pinged in these tests")


def liveness_of(node: str, clock: Clock) -> Liveness:
    members = {member: f"{member}:1" for member in "abc"}
    return Liveness(node, lambda: members, _no_ping, clock=clock)


def test_no_member_is_promised_until_lease_after_this_node_started() -> None:
    """It may have granted one a lease just before it (re)started."""
    clock = Clock()
    c = liveness_of("c", clock)
    c._heard["b"] = clock.now
    assert list(c.answer("b").not_granting) == []
    clock.now += LEASE
    c._heard["b"] = clock.now
    assert list(c.answer("b").not_granting) == ["a"]  # b asked, and is heard: granted, not promised


def test_a_member_that_asks_but_is_not_heard_is_promised_no_lease() -> None:
    """Its pings reach this node, this node's do not reach it (a node restarted, whose channel
    has not reconnected yet): it is granted nothing, so it is promised nothing."""
    clock = Clock()
    c = liveness_of("c", clock)
    clock.now += 2 * LEASE
    answer = c.answer("a")
    assert not answer.sees_you
    assert "a" in c.answer("b").not_granting


def test_a_member_promised_no_lease_is_granted_none_until_lease_after_the_last_promise() -> None:
    clock = Clock()
    c = liveness_of("c", clock)
    clock.now += 2 * LEASE
    assert "a" in c.answer("b").not_granting  # a has not asked since c started
    clock.now += 0.1
    c._heard["a"] = clock.now  # c hears a again, and a asks
    answer = c.answer("a")
    assert not answer.sees_you  # promised to b 0.1 s ago: kept
    assert "a" not in c.answer("b").not_granting  # a asked: no promise more
    clock.now += LEASE - 0.1 - 0.01
    assert not c.answer("a").sees_you
    clock.now += 0.02
    c._heard["a"] = clock.now
    assert c.answer("a").sees_you


def test_this_node_counts_its_own_promise_and_keeps_it() -> None:
    """Of three members, two promises leave a member no lease: the other's and this node's own,
    which this node then keeps (it grants that member nothing for LEASE)."""
    clock = Clock()
    b = liveness_of("b", clock)
    clock.now += 2 * LEASE
    assert b.serving("a")  # no word from c: a may hold its lease through c
    b._promises["a"] = {"c": clock.now - 0.1}  # c promised, to a ping b sent 0.1 s ago
    assert not b.serving("a")
    b._heard["a"] = clock.now
    assert not b.answer("a").sees_you
    clock.now += LEASE - 0.05  # c's promise has run out: a may hold a lease again (not from b)
    assert b.serving("a")
