"""One store over many nodes: placement by member list, forwarding, hand-offs, peer admission.

topology     the member list (--cluster), its file watched; who owns a key
node         Cluster: one node's membership, peers, hand-offs and admission together
admission    which calls come from members (PeerGrant), by name and certificate
router       ClusterRouter: each operation to its key's owner; redirects, fan-out, asks
peers        the connections to the other members
handoff      keys moved to their new owners when the members change
"""

from __future__ import annotations

from nestkv.server.cluster.admission import DNS_LABEL, DNS_NAME, PeerGrant
from nestkv.server.cluster.handoff import HandOff
from nestkv.server.cluster.node import Cluster
from nestkv.server.cluster.peers import PEER_HEADER, Peers
from nestkv.server.cluster.router import ClusterRouter
from nestkv.server.cluster.topology import ClusterConfigError, Membership, Topology, own_id, parse_members

__all__ = [
    "DNS_LABEL",
    "DNS_NAME",
    "PEER_HEADER",
    "Cluster",
    "ClusterConfigError",
    "ClusterRouter",
    "HandOff",
    "Membership",
    "PeerGrant",
    "Peers",
    "Topology",
    "own_id",
    "parse_members",
]
