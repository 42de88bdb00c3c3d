"""ServerConfig: every setting of the server in one typed object; the CLI flags map onto its fields."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from nestkv.server.limits import Limits

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class ServerConfig(msgspec.Struct, frozen=True):
    """How to run the server. Defaults serve on 127.0.0.1:50051 with nothing else to set up."""

    host: str = "127.0.0.1"
    """Address to listen on (`0.0.0.0` or `::` for every interface)."""
    port: Port = 50051
    """TCP port to listen on; 0 picks a free one (the ready line names it)."""
    shutdown_grace: Seconds = 10.0
    """Seconds in-flight calls get to finish after SIGINT/SIGTERM."""
    reap_interval: Seconds = 0.1
    """Seconds between two rounds of active expiry."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level: DEBUG, INFO, WARNING or ERROR."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """Event loop: uvloop (faster; `pip install nestkv[uvloop]`), asyncio, or auto (uvloop if installed)."""
    data_dir: str = ""
    """Directory for the append-only log and snapshots; empty: keep everything in memory only."""
    fsync: Literal["always", "everysec", "no"] = "everysec"
    """When the log is fsynced: before each write is answered, once a second, or when the OS likes."""
    snapshot_interval: Seconds = 300.0
    """Seconds between snapshots (taken only if something changed); one is also taken at shutdown."""
    max_memory: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Bound on the memory the entries take, in bytes (suffixes K, M, G on the command line); 0: none."""
    eviction_policy: Literal["noeviction", "allkeys-lru", "volatile-lru", "volatile-ttl"] = "noeviction"
    """What a write over max_memory does: fail (noeviction) or evict, as Redis's maxmemory-policy."""
    max_concurrent_streams: Annotated[int, msgspec.Meta(ge=1)] = 100
    """Calls one client connection may have open at once; more wait their turn."""
    metrics_port: Port | None = None
    """Serve Prometheus metrics at http://metrics_host:metrics_port/metrics (0: a free port); None: off."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics are served on: plain HTTP without tokens, so loopback unless asked for."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or as one JSON object a line (for log collectors)."""
    tls_cert: str = ""
    """PEM certificate chain to serve TLS with (with tls_key); reloaded on SIGHUP."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA certificates that client certificates must chain to: mutual TLS (needs tls_cert)."""
    auth_file: str = ""
    """TOML file of tokens, each confined to a namespace; every call then needs one. Reloaded on SIGHUP."""
    insecure: bool = False
    """Serve a non-loopback host with neither client certificates nor tokens, on purpose."""
    node_id: str = ""
    """This node's id in the cluster's member list; empty: the host name (a StatefulSet's pod name)."""
    cluster: str = ""
    """Members, every node's id and address: `ID=HOST:PORT,...`, or `@FILE` with one a line, re-read
    when it changes; empty: a cluster of one."""
    cluster_name: str = ""
    """The cluster's DNS name (a StatefulSet's headless Service: `nestkv.NAMESPACE.svc`). Under
    mutual TLS a peer is recognised by the DNS name `NODE_ID.CLUSTER_NAME` in its certificate, and
    by nothing else, so that two clusters under one CA are strangers; required then."""
    health_port: Port | None = None
    """Also serve grpc.health.v1 alone, in plaintext, on this port (for Kubernetes' gRPC probes,
    which do not speak TLS); None: off."""
    tombstone_age: Seconds = 3600.0
    """In a cluster, seconds a delete is remembered (a tombstone), so that an older copy of the key
    arriving meanwhile does not bring it back; a node whose data directory was away longer refuses
    to start with it."""
    max_tombstones: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000
    """In a cluster, most tombstones a delete that removes nothing may leave: over it, such a delete
    is refused (as it is when its tombstone would not fit --max-memory or its quota). Tombstones
    are never dropped before tombstone_age: that would undo deletes."""
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """In a cluster, copies kept of every key, on as many members (fewer if there are fewer
    members): 1 keeps each key on its owner only; 2 or more survive that many nodes minus one
    down, and fail over within a second."""
    min_copies: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    """Copies a write must be stored on before it is answered (stand-ins for copies that are
    down count); 0: min(replicas, 2). Fewer live: the write fails, applied nowhere."""
    drain_timeout: Seconds = 60.0
    """On SIGTERM, seconds to hand this node's keys to the other members before it exits."""
    limits: Limits = Limits()
    """Request limits (each of its fields is a flag of its own)."""

    def __post_init__(self) -> None:
        if self.min_copies > self.replicas:
            raise ValueError(
                f"--min-copies {self.min_copies} is more than --replicas {self.replicas}: "
                "a write cannot wait for more copies than a key has"
            )

    @property
    def copies_needed(self) -> int:
        """The copies a write waits for: --min-copies, or min(--replicas, 2)."""
        return self.min_copies or min(self.replicas, 2)

    def address(self, port: int | None = None, host: str | None = None) -> str:
        """`host:port` (IPv6 hosts in brackets), with `port` and `host` in place of the configured ones."""
        host = self.host if host is None else host
        port = self.port if port is None else port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
