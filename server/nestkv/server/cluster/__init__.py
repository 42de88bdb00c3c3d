"""One store over many nodes: who owns a key, forwarding to the owner, fan-out, peer admission.

Kubernetes (or whoever runs the nodes) gives every node the same member list;
nothing here elects or agrees on anything. `Cluster` answers, for each
operation a node receives, whether it runs here or goes to its owner, and
admits the calls other members forward.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import grpc

from nestkv.server.cluster.handoff import HandOff
from nestkv.server.cluster.peers import MODE_HEADER, MODES, PEER_HEADER, Peers, failure_of
from nestkv.server.cluster.topology import ClusterConfigError, Membership, Topology, parse_members
from nestkv.server.errors import Unauthenticated
from nestkv.server.metrics import OperationMetrics
from nestkv.server.security import Gate, Grant
from nestkv.v1 import store_pb2 as pb

__all__ = [
    "DNS_LABEL",
    "DNS_NAME",
    "PEER_HEADER",
    "Cluster",
    "ClusterConfigError",
    "HandOff",
    "Membership",
    "PeerGrant",
    "Topology",
    "missed",
    "parse_members",
]

_CODE_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}
# Under mutual TLS a member's id is the first label of the DNS name its certificate carries:
# one label, or ids with dots would name another cluster's nodes (a.b of c.svc is a of b.c.svc).
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_LABEL = re.compile(_LABEL)
DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
"""--cluster-name: lower-case DNS labels, dot-separated (what a certificate's DNS name holds)."""


class PeerGrant(Grant):
    """A call another member forwarded: its paths were scoped there, its operations run here.

    `sender` is the node that forwarded it; `mode` why (nestkv.server.cluster.peers.MODE_HEADER):
    "" sent to the owner, "redirected" (run here whatever this node's list says), "asked" (a
    new owner asking the previous one: answered from what is here, nothing more).
    """

    __slots__ = ("mode", "sender")
    forwarded = True

    def __init__(self, sender: str, mode: str, limits: Any) -> None:
        super().__init__("peer", (), True, limits)
        self.sender = sender
        self.mode = mode

    def scope(self, kind: str, request: Any) -> None:
        pass


class Cluster:
    """Routing of one node: its membership, its connections to the peers, and who may forward."""

    def __init__(self, membership: Membership, peers: Peers, gate: Gate, *, peer_domain: str | None) -> None:
        """A forwarded call must name a node of the current member list or the one before it;
        with a `peer_domain` (mutual TLS: --cluster-name), its client certificate (of
        --tls-client-ca) must carry the DNS name `NODE.peer_domain` as a subject alternative name:
        not a common name, an email or a URI, and not the bare node id, which any certificate of
        another cluster under the same CA may carry too. Without it the name is all there is,
        which grants nothing when every caller may do everything already: open_cluster refuses a
        cluster with tokens and without mutual TLS."""
        self.membership = membership
        self.peers = peers
        self._gate = gate
        self._peer_domain = peer_domain
        self._peers: dict[tuple[str, str], PeerGrant] = {}
        self._read_at = 0.0  # when the member file was last read for a caller claiming to be one
        self._heard_at = 0.0  # when it was last read for a caller with another version
        self._asking: asyncio.Task[None] | None = None  # a peer asked for its list
        self.handoff: HandOff | None = None
        """Set once the storage is recovered, before the server takes calls (nestkv.server.app)."""

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

    def admit(self, context: Any) -> Grant:
        """The grant of a call: a peer's forwarded call, or a caller's by its token (Gate.admit)."""
        metadata = context.invocation_metadata() or ()
        for key, value in metadata:
            if key == PEER_HEADER:
                self._check_peer(context, value)
                mode = next((mode for name, mode in metadata if name == MODE_HEADER), "")
                if mode not in MODES:
                    raise Unauthenticated(f"{MODE_HEADER} must be one of {', '.join(MODES[1:])}")
                grant = self._peers.get((value, mode))
                if grant is None:
                    grant = self._peers[value, mode] = PeerGrant(value, mode, self._gate.everything.limits)
                return grant
        return self._gate.admit(context)

    def _check_peer(self, context: Any, sender: str) -> None:
        if not self._is_member(sender):
            raise Unauthenticated(
                f"forwarded calls are taken only from cluster members; {sender!r} is not one "
                "(of the current member list or the one before it)"
            )
        if self._peer_domain is None:
            return
        if not DNS_LABEL.fullmatch(sender):
            raise Unauthenticated(
                f"forwarded calls are taken only from cluster members named by one lower-case DNS "
                f"label under mutual TLS; {sender!r} is not one"
            )
        # gRPC lists a certificate's DNS subject alternative names, and only those, as peer_dns.
        names = {name.decode(errors="replace").lower() for name in context.auth_context().get("peer_dns", ())}
        expected = f"{sender}.{self._peer_domain}".lower()
        if expected not in names:
            raise Unauthenticated(
                "forwarded calls are taken only from cluster members, by a client certificate "
                f"naming the member: none presented carries the DNS name {expected!r}"
            )

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
        previous = self.handoff.previous if self.handoff is not None else None
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
            self.membership.change(Topology(members), f"node {sender}, one change ahead")

    def _is_member(self, sender: str) -> bool:
        """Whether `sender` is on the current member list or the one before it.

        A node added a moment ago may call before this node has read the new list: the list is
        read again then (at most once a second).
        """
        for _ in range(2):
            previous = self.handoff.previous if self.handoff is not None else None
            if sender in self.topology.members or (previous is not None and sender in previous.members):
                return True
            now = time.monotonic()
            if now - self._read_at < 1.0:
                return False
            self._read_at = now
            self.membership.reload()
        return False

    def owner(self, path: Sequence[str], key: str) -> str | None:
        """The member that owns the key, None if it is this node."""
        owner = self.topology.owner(path, key)
        return None if owner == self.node_id else owner

    def forward(
        self, member: str, operation: pb.Operation, address: str = "", mode: str = ""
    ) -> Awaitable[pb.OperationResult]:
        """Run `operation` on `member` (at `address`, default: its address in the current list); its
        OperationResult, an error result if it failed. Sent on once if the member's list gives the
        key to another node. `mode`: see PeerGrant."""
        topology = self.topology
        address = address or topology.members[member]
        future = self.peers.forward(address, operation, mode, topology.version)
        return self._result_of(member, address, operation, future)

    async def _result_of(
        self, member: str, address: str, operation: pb.Operation, future: asyncio.Future[Any]
    ) -> pb.OperationResult:
        """The result of a forwarded operation, following a redirect once.

        A node that redirects still holds the keys it has not handed off yet: a read that misses
        where it was redirected to is asked of it once more.
        """
        try:
            result: pb.OperationResult = await future
            if _moved(result):
                moved_from = address
                member, address = result.error.moved_to.id, result.error.moved_to.address
                version = self.topology.version
                result = await self.peers.forward(address, operation, "redirected", version)
                if _moved(result):  # sent on once only: the lists are changing, try again
                    return error_result(
                        "UNAVAILABLE", f"the member lists of the nodes disagree: {result.error.message}"
                    )
                if missed(operation, result):
                    member = f"{member}'s previous owner"
                    result = await self.peers.forward(moved_from, operation, "asked", version)
        except Exception as error:
            return error_result(*failure_of(member, error))
        return result

    @staticmethod
    def moved(result: pb.OperationResult, member: str, address: str) -> None:
        """Fill `result` with the answer to a peer whose list gives a key to another node than ours."""
        result.error.code = grpc.StatusCode.ABORTED.value[0]
        result.error.message = f"this node's member list gives the key to {member}"
        result.error.moved_to.id = member
        result.error.moved_to.address = address

    def fan_out(
        self, operation: pb.Operation, metrics: OperationMetrics | None = None
    ) -> Awaitable[pb.OperationResult | None]:
        """Run `operation` (a delete_all) on every other member: None if all did, else an error result
        naming those that did not."""
        members = self.topology.members
        if metrics:
            for member in members:
                if member != self.node_id:
                    metrics.forwarded[member] = metrics.forwarded.get(member, 0) + 1
        futures = {
            member: self.peers.forward(address, operation, version=self.topology.version)
            for member, address in members.items()
            if member != self.node_id
        }
        return _all_of(futures)

    async def stats(self, request: pb.StatsRequest) -> dict[str, pb.StatsResponse | str]:
        """Every other member's own figures for the scoped path, or why it did not answer."""
        others = [
            (member, address) for member, address in self.topology.members.items() if member != self.node_id
        ]
        answers = await asyncio.gather(
            *(self.peers.stats(address, request) for _, address in others), return_exceptions=True
        )
        return {
            member: answer if isinstance(answer, pb.StatsResponse) else f"{member}: {answer}"
            for (member, _), answer in zip(others, answers, strict=True)
        }


def _moved(result: pb.OperationResult) -> bool:
    return result.WhichOneof("result") == "error" and result.error.HasField("moved_to")


def missed(operation: pb.Operation, result: pb.OperationResult) -> bool:
    """Whether `result` is that of a read that found nothing."""
    kind = operation.WhichOneof("operation")
    if kind not in ("get", "exists", "expires_in") or result.WhichOneof("result") != kind:
        return False
    return not (result.exists.exists if kind == "exists" else getattr(result, kind).found)


def error_result(code: str, message: str) -> pb.OperationResult:
    result = pb.OperationResult()
    result.error.code = _CODE_NUMBERS.get(code, grpc.StatusCode.UNKNOWN.value[0])
    result.error.message = message
    return result


async def _all_of(futures: dict[str, asyncio.Future[Any]]) -> pb.OperationResult | None:
    failed = []
    for member, future in futures.items():
        try:
            result: pb.OperationResult = await future
        except Exception as error:
            failed.append((member, failure_of(member, error)[1]))
            continue
        if result.WhichOneof("result") == "error":
            failed.append((member, f"node {member}: {result.error.message}"))
    if not failed:
        return None
    return error_result(
        "UNAVAILABLE",
        f"delete_all did not reach {len(failed)} of {len(futures) + 1} nodes, whose keys remain: "
        + "; ".join(message for _, message in failed),
    )
