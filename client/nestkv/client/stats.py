"""What `GrpcStore.stats()` returns: the figures of a namespace subtree and of the whole server."""

from __future__ import annotations

from typing import Any

import msgspec


class NamespaceStats(msgspec.Struct, frozen=True, gc=False):
    """A namespace with everything below it."""

    keys: int
    """Keys held, expired keys not yet reclaimed included."""
    bytes: int
    """Bytes those keys take as --max-memory counts them (key, value, fixed overhead per key), with
    the namespaces that hold them and their expiry bookkeeping."""
    expiring_keys: int
    """Of those keys, the ones with an expiry."""
    child_namespaces: int
    """Namespaces directly below that hold keys, or hold namespaces that do."""


class ServerStats(msgspec.Struct, frozen=True, gc=False):
    """The whole server."""

    keys: int
    """Keys in the whole store, expired keys not yet reclaimed included."""
    memory_bytes: int
    """Bytes the keys take as --max-memory counts them."""
    max_memory_bytes: int
    """The --max-memory bound; 0: none."""
    evictions: int
    """Keys evicted since the server started."""
    expired_keys: int
    """Keys reclaimed after they expired since the server started."""
    uptime_seconds: float
    """Seconds since the server started."""
    version: str
    """The server's nestkv version."""
    keys_first_copy: int = 0
    """With replicas (else 0), as last counted: keys held as their first copy,"""
    keys_replica: int = 0
    """as another copy,"""
    keys_held_for_others: int = 0
    """and as neither: for a copy that is down (a stand-in), or on their way to their copies."""
    replication_failures: int = 0
    """Replicas sent that a copy or stand-in did not store, since the server started."""


class Quota(msgspec.Struct, frozen=True, gc=False):
    """A namespace's byte quota (a token's `max_bytes`), checked on each node, and its use."""

    max_bytes: int
    """The quota, in bytes, on each node."""
    used_bytes: int
    """Bytes the namespace takes, as --max-memory counts; in a cluster's totals, the most on one node."""
    path: tuple[str, ...] = ()
    """The namespace the quota is on, from the store's root (a token's root: its own quota is ())."""


class NodeStats(msgspec.Struct, frozen=True):
    """One node's own figures, in a cluster."""

    namespace: NamespaceStats
    server: ServerStats
    quota: Quota | None = None


class Stats(msgspec.Struct, frozen=True):
    """The answer to `GrpcStore.stats()`: the store's namespace subtree, and the server.

    In a cluster, `namespace` and `server` are sums over the nodes (`uptime_seconds` and
    `version` are the answering node's; `child_namespaces` the most any node has), and `nodes`
    gives each node's own figures by node id; a single server leaves `nodes` empty.
    """

    path: tuple[str, ...]
    """The namespace described (the store's own)."""
    namespace: NamespaceStats
    server: ServerStats
    nodes: dict[str, NodeStats] = {}
    """Each node's own figures, by node id (a cluster only)."""
    quota: Quota | None = None
    """The byte quota that applies to the namespace (its innermost one with a quota); None: none."""


def stats_from_response(path: tuple[str, ...], response: Any) -> Stats:
    """A Stats from a nestkv.v1.StatsResponse."""
    return Stats(
        path=path,
        namespace=_namespace(response.namespace),
        server=_server(response.server),
        nodes={
            node.node_id: NodeStats(
                namespace=_namespace(node.namespace), server=_server(node.server), quota=_quota(node)
            )
            for node in response.nodes
        },
        quota=_quota(response),
    )


def _quota(response: Any) -> Quota | None:
    if not response.HasField("quota"):
        return None
    quota = response.quota
    return Quota(max_bytes=quota.max_bytes, used_bytes=quota.used_bytes, path=tuple(quota.path))


def _namespace(namespace: Any) -> NamespaceStats:
    return NamespaceStats(
        keys=namespace.keys,
        bytes=namespace.bytes,
        expiring_keys=namespace.expiring_keys,
        child_namespaces=namespace.child_namespaces,
    )


def _server(server: Any) -> ServerStats:
    return ServerStats(
        keys=server.keys,
        memory_bytes=server.memory_bytes,
        max_memory_bytes=server.max_memory_bytes,
        evictions=server.evictions,
        expired_keys=server.expired_keys,
        uptime_seconds=server.uptime.ToNanoseconds() / 1e9,
        version=server.version,
        keys_first_copy=server.keys_first_copy,
        keys_replica=server.keys_replica,
        keys_held_for_others=server.keys_held_for_others,
        replication_failures=server.replication_failures,
    )
