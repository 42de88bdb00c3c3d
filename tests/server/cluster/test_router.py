"""ClusterRouter in process, against fake peers (tests/server/cluster/nodes.py): where each operation runs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from nestkv.server.cluster import PeerGrant
from nestkv.v1 import store_pb2 as pb
from tests.errorfields import fields_of, info_of
from tests.server.cluster.nodes import LIMITS, InProcessCluster, address_of, keys_owned_by

PATH = ("ns",)


@pytest.fixture
async def three() -> AsyncIterator[InProcessCluster]:
    cluster = InProcessCluster(["a", "b", "c"])
    yield cluster
    await cluster.close()


async def test_a_key_another_node_owns_is_stored_there_only(three: InProcessCluster) -> None:
    a, b, c = three.nodes["a"], three.nodes["b"], three.nodes["c"]
    [key] = keys_owned_by("b", a.membership.current, 1)
    assert (await a.set(key, b"v")).WhichOneof("result") == "set"
    assert [node.holds(key) for node in (a, b, c)] == [False, True, False]
    for node in (a, b, c):
        assert (await node.get(key)).get.value == b"v"
    assert a.metrics.forwarded == {"b": 2}  # the set and the get sent to b; b ran them itself
    assert b.metrics.forwarded == {}
    assert b.metrics.counts["set", "OK"] == 1


async def test_a_delete_all_reaches_every_node_unless_the_client_sent_it_to_each(
    three: InProcessCluster,
) -> None:
    a = three.nodes["a"]
    keys = [key for member in "abc" for key in keys_owned_by(member, a.membership.current, 2)]
    for key in keys:
        await a.set(key, b"v")
    assert [three.nodes[m].storage.keys for m in "abc"] == [2, 2, 2]
    clear = pb.Operation(delete_all=pb.DeleteAllRequest(path=PATH))
    # A client routing by this node's list sends delete_all to every node itself: here only.
    [result] = await a.call(clear, version=a.membership.current.version)
    assert result.WhichOneof("result") == "delete_all"
    assert [three.nodes[m].storage.keys for m in "abc"] == [0, 2, 2]
    # One that does not route (or routes by another list): here, and on every other node.
    [result] = await a.call(clear)
    assert result.WhichOneof("result") == "delete_all"
    assert [three.nodes[m].storage.keys for m in "abc"] == [0, 0, 0]
    assert a.metrics.forwarded == {"b": 2 + 1, "c": 2 + 1}


async def test_a_node_down_fails_its_keys_alone(three: InProcessCluster) -> None:
    a = three.nodes["a"]
    topology = a.membership.current
    keys = [keys_owned_by(member, topology, 1)[0] for member in "abc"]
    three.down.add("c")
    results = await a.call(*(pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"v")) for key in keys))
    assert [result.WhichOneof("result") for result in results] == ["set", "set", "error"]
    assert fields_of(results[2].error)[:2] == ("UNAVAILABLE", "ERROR_REASON_UNREACHABLE")
    assert info_of(results[2].error.details).metadata["node"] == "c"
    clear = await a.call(pb.Operation(delete_all=pb.DeleteAllRequest(path=PATH)))
    # The other nodes' keys are gone: not "not applied".
    assert fields_of(clear[0].error) == ("UNAVAILABLE", "ERROR_REASON_UNREACHABLE", "APPLIED_OUTCOME_UNKNOWN")


async def test_a_node_whose_list_gives_the_key_elsewhere_redirects_the_sender_once(
    three: InProcessCluster,
) -> None:
    a, b, c = three.nodes["a"], three.nodes["b"], three.nodes["c"]
    three.change(["a", "b"], on=["a"])  # a has not read that c joined yet
    old, new = a.membership.current, b.membership.current
    key = next(key for key in keys_owned_by("c", new, 50) if old.owner(PATH, key) == "b")
    write = pb.Operation(set=pb.SetRequest(path=PATH, key=key, value=b"v"))
    # b answers a peer's operation on that key with where it is: ABORTED naming c, nothing stored.
    batch = pb.PipelineRequest(operations=[write])
    responses, _ = await b.runner.run_all(batch, PeerGrant("a", "", LIMITS))
    [result] = responses[0].results
    assert result.error.code == grpc.StatusCode.ABORTED.value[0]
    assert (result.error.moved_to.id, result.error.moved_to.address) == ("c", address_of("c"))
    assert not b.holds(key)
    # So a client's write through a, forwarded to b by a's list, lands on c: a follows once.
    assert (await a.set(key, b"v")).WhichOneof("result") == "set"
    assert [node.holds(key) for node in (a, b, c)] == [False, False, True]


async def test_stats_add_every_node_s_figures(three: InProcessCluster) -> None:
    a = three.nodes["a"]
    for member in "abc":
        for key in keys_owned_by(member, a.membership.current, 3):
            await a.set(key, b"v")
    response = pb.StatsResponse()
    a.operations.stats(pb.StatsRequest(path=PATH), response)
    await a.router.stats(pb.StatsRequest(path=PATH), response)
    assert [node.node_id for node in response.nodes] == ["a", "b", "c"]
    assert [node.namespace.keys for node in response.nodes] == [3, 3, 3]
    assert response.namespace.keys == 9


async def test_the_topology_names_every_member(three: InProcessCluster) -> None:
    response = pb.TopologyResponse()
    three.nodes["b"].router.describe(response)
    assert {member.id: member.address for member in response.members} == {m: address_of(m) for m in "abc"}
    assert response.node_id == "b"
    assert response.version == three.nodes["b"].membership.current.version


async def test_a_read_redirected_while_its_key_is_handed_off_finds_it_on_the_new_owner(
    three: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = three.nodes["a"], three.nodes["b"], three.nodes["c"]
    three.change(["a", "c"], on=["b", "c"])  # b leaves; a has not read that yet
    old, new = a.membership.current, c.membership.current
    key = next(key for key in keys_owned_by("c", new, 50) if old.owner(PATH, key) == "b")
    b.storage.set(PATH, key, b"v")  # written before the change: b hands it off to c
    forward = a.peers._run

    async def hand_off_between_the_two_misses(
        address: str, operation: pb.Operation, mode: str
    ) -> pb.OperationResult:
        if mode == "asked":  # a's read went to b, then to c, which did not hold the key yet
            c.storage.set(PATH, key, b"v")  # the hand-off stores it on c, then b drops it
            b.storage.delete(PATH, key)
        return await forward(address, operation, mode)

    monkeypatch.setattr(a.peers, "_run", hand_off_between_the_two_misses)
    result = await a.get(key)
    assert (result.get.found, result.get.value) == (True, b"v")
