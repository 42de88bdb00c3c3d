"""Which calls come from the other members: a forwarded call is admitted by who sent it.

Under mutual TLS a member's id is the first label of the DNS name its certificate carries
(`NODE_ID.CLUSTER_NAME`); without TLS the name in the `nestkv-peer` header is all there is,
which grants nothing when every caller may do everything already (nestkv.server.app refuses a
cluster with tokens and without mutual TLS).
"""

from __future__ import annotations

import re
import time
from typing import Any

from nestkv.server.cluster.handoff import HandOff
from nestkv.server.cluster.peers import MODE_HEADER, MODES, PEER_HEADER
from nestkv.server.cluster.topology import Membership
from nestkv.server.errors import NodesOnly
from nestkv.server.security import Gate, Grant

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


class PeerAdmission:
    """Admits each PeerService call by its sender: a member of the cluster (callers' calls, to
    StoreService, are the Gate's: by their token)."""

    def __init__(
        self, membership: Membership, handoff: HandOff, gate: Gate, *, peer_domain: str | None
    ) -> None:
        """A forwarded call must name a node of the current member list or the one before it;
        with a `peer_domain` (mutual TLS: --cluster-name), its client certificate (of
        --tls-client-ca) must carry the DNS name `NODE.peer_domain` as a subject alternative name:
        not a common name, an email or a URI, and not the bare node id, which any certificate of
        another cluster under the same CA may carry too."""
        self._membership = membership
        self._handoff = handoff
        self._gate = gate
        self._peer_domain = peer_domain
        self._peers: dict[tuple[str, str], PeerGrant] = {}
        self._read_at = 0.0  # when the member file was last read for a caller claiming to be one

    def admit_peer(self, context: Any) -> PeerGrant:
        """The grant of a PeerService call: the member it comes from, as its `nestkv-peer` header
        names it (and, under mutual TLS, its certificate); NodesOnly for anyone else."""
        metadata = context.invocation_metadata() or ()
        sender = next((value for key, value in metadata if key == PEER_HEADER), None)
        if sender is None:
            raise NodesOnly(f"PeerService is for the members of a cluster only (no {PEER_HEADER} header)")
        self._check_peer(context, sender)
        mode = next((mode for name, mode in metadata if name == MODE_HEADER), "")
        if mode not in MODES:
            raise NodesOnly(f"{MODE_HEADER} must be one of {', '.join(MODES[1:])}")
        grant = self._peers.get((sender, mode))
        if grant is None:
            grant = self._peers[sender, mode] = PeerGrant(sender, mode, self._gate.everything.limits)
        return grant

    def _check_peer(self, context: Any, sender: str) -> None:
        if not self._is_member(sender):
            raise NodesOnly(
                f"forwarded calls are taken only from cluster members; {sender!r} is not one "
                "(of the current member list or the one before it)"
            )
        if self._peer_domain is None:
            return
        if not DNS_LABEL.fullmatch(sender):
            raise NodesOnly(
                f"forwarded calls are taken only from cluster members named by one lower-case DNS "
                f"label under mutual TLS; {sender!r} is not one"
            )
        # gRPC lists a certificate's DNS subject alternative names, and only those, as peer_dns.
        names = {name.decode(errors="replace").lower() for name in context.auth_context().get("peer_dns", ())}
        expected = f"{sender}.{self._peer_domain}".lower()
        if expected not in names:
            raise NodesOnly(
                "forwarded calls are taken only from cluster members, by a client certificate "
                f"naming the member: none presented carries the DNS name {expected!r}"
            )

    def _is_member(self, sender: str) -> bool:
        """Whether `sender` is on the current member list or the one before it.

        A node added a moment ago may call before this node has read the new list: the list is
        read again then (at most once a second).
        """
        for _ in range(2):
            previous = self._handoff.previous
            if sender in self._membership.current.members or (
                previous is not None and sender in previous.members
            ):
                return True
            now = time.monotonic()
            if now - self._read_at < 1.0:
                return False
            self._read_at = now
            self._membership.reload()
        return False
