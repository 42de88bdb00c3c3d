"""One node's place in the cluster: its member list, its peers, its hand-offs, who may forward to it.

Kubernetes (or whoever runs the nodes) gives every node the same member list;
nothing here elects or agrees on anything. Nodes that read a change of the
list at different moments tell each other (`Cluster.heard_of`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from nestkv.server.cluster.admission import PeerAdmission
from nestkv.server.cluster.handoff import HandOff
from nestkv.server.cluster.liveness import PING_TIMEOUT, Liveness
from nestkv.server.cluster.peers import Peers
from nestkv.server.cluster.replication import Replication
from nestkv.server.cluster.topology import Membership, Topology
from nestkv.server.security import Gate
from nestkv.server.storage import NamespacedStorage
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import store_pb2 as pb


class Cluster:
    """A node of a cluster: the parts that routing, hand-offs and admission share."""

    def __init__(
        self,
        membership: Membership,
        peers: Peers,
        gate: Gate,
        storage: NamespacedStorage,
        *,
        commit: Callable[[], None],
        writable: Callable[[], None],
        peer_domain: str | None,
        min_copies: int = 1,
    ) -> None:
        """`commit` and `writable`: see HandOff; `peer_domain`: see PeerAdmission; `min_copies`:
        copies a write waits for, with the membership's replicas over 1 (see Replication)."""
        self.membership = membership
        self.peers = peers
        self.handoff = HandOff(membership, storage, peers.hand_off, commit=commit, writable=writable)
        self.admission = PeerAdmission(membership, self.handoff, gate, peer_domain=peer_domain)
        self.replication: Replication | None = None
        if membership.replicas > 1:
            liveness = Liveness(membership.node_id, lambda: self.topology.members, self._ping)
            self.replication = Replication(self, storage, liveness, min_copies)
        self.admit_peer = self.admission.admit_peer
        self._heard_at = 0.0  # when the member file was last read for a caller with another version
        self._asking: asyncio.Task[None] | None = None  # a peer asked for its list

    def _ping(self, member: str, address: str) -> Awaitable[peer_pb.PingResponse]:
        return self.peers.ping(address, PING_TIMEOUT)

    def roles(self, server: pb.ServerStats) -> None:
        """Put this node's keys by role, and its replication failures, in its Stats figures."""
        replication = self.replication
        if replication is None:
            return
        server.keys_first_copy = replication.roles["first_copy"]
        server.keys_replica = replication.roles["replica"]
        server.keys_held_for_others = replication.roles["held_for_others"]
        server.replication_failures = replication.failures

    def answer_ping(self, sender: str) -> peer_pb.PingResponse:
        """The answer to a ping from the member `sender`."""
        if self.replication is None:  # nobody pings a node without replicas: it serves its keys
            return peer_pb.PingResponse(current=True, sees_you=True)
        return self.replication.liveness.answer(sender)

    @property
    def node_id(self) -> str:
        return self.membership.node_id

    @property
    def topology(self) -> Topology:
        return self.membership.current

    @property
    def removed(self) -> bool:
        """Whether this node is off its own member list (being removed: it hands everything off)."""
        return self.node_id not in self.membership.current.members

    def others(self) -> dict[str, str]:
        """The other members of the current list, and their addresses."""
        return self.topology.others(self.node_id)

    def take(self, sender: str, request: peer_pb.HandOffRequest) -> tuple[int, int]:
        """One message of a hand-off from `sender`: its keys stored here unless news to nobody;
        (stored, skipped). Raises StoreFault if they cannot be stored."""
        self.heard_of(request.topology_version, sender)
        return self.handoff.take(sender, request)

    def owner(self, path: Sequence[str], key: str) -> str | None:
        """The member that owns the key (its first copy), None if this node keeps a copy."""
        topology = self.topology
        if topology.replicas > 1 and topology.holds(self.node_id, path, key):
            return None
        owner = topology.owner(path, key)
        return None if owner == self.node_id else owner

    def catch_up_for(self, sender: str, version: str) -> AsyncIterator[peer_pb.HandOffRequest]:
        """The answer to a CatchUp from the member `sender`, placed by the list of `version`: what
        this node holds of its keys."""
        self.heard_of(version, sender)
        if self.replication is not None:
            self.replication.liveness.catching_up(sender)
        return self.handoff.copies_for(sender)

    def heard_of(self, version: str, sender: str = "") -> None:
        """A caller placed its operations by a member list of `version`: if that is not this node's
        list, read the member file again now (at most every 0.1 s), and if that does not give
        it, ask `sender` (a peer) for its list, and take it if the peer's list before was this
        node's current one: the peer is one change ahead.

        Nodes read the file at different moments (a ConfigMap reaches pods up to a minute
        apart); while they disagree about who owns a key, a write may go to a node that no
        longer owns it. The first node to read a change tells the others, by the version on what
        it forwards and hands off (every pass reaches every member of the list before and after),
        so they agree within a message or two.
        """
        current = self.membership.current.version
        previous = self.handoff.previous
        if version == current or (previous is not None and version == previous.version):
            return  # this node's list, or the one before (that peer is behind, and will hear)
        now = time.monotonic()
        if now - self._heard_at < 0.1:
            return
        self._heard_at = now
        if self.membership.reload() or not sender or self._asking is not None:
            return
        address = self.topology.members.get(sender) or (previous.members.get(sender) if previous else None)
        if address:
            self._asking = asyncio.get_running_loop().create_task(self._take_list_of(sender, address))

    async def _take_list_of(self, sender: str, address: str) -> None:
        try:
            response = await self.peers.topology(address)
        except grpc.aio.AioRpcError:
            return
        finally:
            self._asking = None
        if response.previous_version and response.previous_version == self.membership.current.version:
            members = {member.id: member.address for member in response.members}
            self.membership.change(self.membership.topology(members), f"node {sender}, one change ahead")
