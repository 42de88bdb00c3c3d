"""Build and run the grpc.aio server: store service, health, reflection, options, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nestkv.server.cluster import (
    DNS_LABEL,
    DNS_NAME,
    Cluster,
    ClusterConfigError,
    ClusterRouter,
    Membership,
    Peers,
    own_id,
)
from nestkv.server.cluster.liveness import INTERVAL, wait_changed
from nestkv.server.config import ServerConfig
from nestkv.server.metrics import Denials, OperationMetrics, StoreCollector, serve_metrics
from nestkv.server.operations import Operations, unlogged
from nestkv.server.router import LocalRouter, Router
from nestkv.server.security import Gate, SecurityConfigError, TlsFiles, open_security
from nestkv.server.service import PEER_SERVICE_NAME, SERVICE_NAME, StoreServicer
from nestkv.server.storage import NamespacedStorage
from nestkv.server.storage.clock import BOUND_AHEAD, HybridClock, seconds_of
from nestkv.server.storage.persistence import Persistence, PersistenceError
from nestkv.server.storage.tombstones import Tombstones
from nestkv.server.version import VERSION
from nestkv.wire.channel import is_loopback_host

log = logging.getLogger("nestkv.server")

STEPPED_DOWN_GRACE = 1.0
"""Seconds a node with replicas gives in-flight calls once it has stepped down (at most)."""

_REAP_BATCH = 2_000  # steps between two yields to the event loop: well under a millisecond


class StoreServer:
    """A grpc.aio server (not started) hosting the store, health and reflection."""

    __slots__ = ("health", "server", "store")

    def __init__(self, server: Any, store: StoreServicer, health: Any) -> None:
        self.server = server
        self.store = store
        self.health = health

    async def stop(self, grace: float) -> None:
        """Refuse new calls, end Pipeline streams after their current batch, give unary calls `grace` s."""
        await self.health.enter_graceful_shutdown()
        self.store.stop_streams()
        await self.server.stop(grace)


def build_server(
    config: ServerConfig,
    storage: NamespacedStorage,
    persistence: Persistence | None = None,
    metrics: OperationMetrics | None = None,
    gate: Gate | None = None,
    cluster: Cluster | None = None,
) -> StoreServer:
    """A grpc.aio server (not started) hosting the store, health and reflection."""
    message_bytes = config.limits.max_message_bytes()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            # Without this a second server on the same port would start and share the traffic.
            ("grpc.so_reuseport", 0),
            # One client cannot hold more calls than this open on a connection and starve the rest.
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            # Clients find dead connections by keepalive pings (GrpcStore sends one every 10 s, also
            # while idle): permit them, as often as once a second, instead of answering GOAWAY.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
            # And find dead clients the same way, so that their calls do not hold streams forever.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
    )
    operations = Operations(storage, config.limits, persistence.writable if persistence else None)
    router: Router = ClusterRouter(cluster, operations, metrics) if cluster else LocalRouter()
    store_servicer = StoreServicer(
        operations,
        router,
        config.limits,
        commit=persistence.commit if persistence else None,
        metrics=metrics,
        gate=gate,
        cluster=cluster,
    )
    store_servicer.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            PEER_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return StoreServer(server, store_servicer, health_servicer)


def reload_security(tls: TlsFiles | None, gate: Gate, storage: NamespacedStorage) -> None:
    """SIGHUP: read the TLS files and the auth file again; one that fails to load is kept as it was."""
    if tls is not None:
        tls.reload()
    gate.reload()
    storage.quotas = gate.quotas


def describe_security(tls: TlsFiles | None, gate: Gate) -> str:
    """How callers reach the store, for the ready line: `, TLS`, `, mutual TLS`, `, N tokens`."""
    parts = []
    if tls is not None:
        parts.append("mutual TLS" if tls.client_ca else "TLS")
    if gate.required:
        parts.append(f"{gate.tokens()} from {gate.path}")
    return "".join(f", {part}" for part in parts)


def open_cluster(
    config: ServerConfig,
    tls: TlsFiles | None,
    gate: Gate,
    storage: NamespacedStorage,
    persistence: Persistence | None,
) -> Cluster | None:
    """The cluster this node is one of (None without --cluster); exits if it cannot be one."""
    if not config.cluster:
        return None
    try:
        membership = Membership(config.node_id, config.cluster, config.replicas)
    except ClusterConfigError as error:
        raise SystemExit(f"nestkv: {error}") from None
    credentials = None
    if tls is not None:
        if not tls.client_ca:
            raise SystemExit(
                "nestkv: a cluster served over TLS needs --tls-client-ca: the nodes present their "
                "--tls-cert to each other and check the other's against that CA (mutual TLS)"
            )
        labels = [member for member in membership.current.members if not DNS_LABEL.fullmatch(member)]
        if labels:
            raise SystemExit(
                f"nestkv: under mutual TLS every member id must be one lower-case DNS label (a peer is "
                f"known by the DNS name ID.CLUSTER_NAME in its certificate); not: {', '.join(labels)}"
            )
        if not DNS_NAME.fullmatch(config.cluster_name):
            raise SystemExit(
                f"nestkv: a cluster served over TLS needs --cluster-name, a DNS name such as "
                f"nestkv.NAMESPACE.svc (given: {config.cluster_name!r}): "
                "a peer is recognised by the DNS name NODE_ID.CLUSTER_NAME in its certificate, so that "
                "another cluster's nodes under the same CA are not taken for members"
            )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(config.tls_client_ca).read_bytes(),
            private_key=Path(config.tls_key).read_bytes(),
            certificate_chain=Path(config.tls_cert).read_bytes(),
        )
    elif gate.required:
        raise SystemExit(
            "nestkv: a cluster with --auth-file needs mutual TLS (--tls-cert, --tls-key, --tls-client-ca): "
            "a node takes forwarded operations, already scoped to their caller's token, only from "
            "a member that proves who it is by its certificate"
        )
    peers = Peers(
        membership.node_id, credentials, config.limits.max_value_bytes, lambda: membership.current.version
    )
    return Cluster(
        membership,
        peers,
        gate,
        storage,
        commit=persistence.commit if persistence else unlogged,
        writable=persistence.writable if persistence else unlogged,
        peer_domain=config.cluster_name if tls is not None else None,
        min_copies=config.copies_needed,
    )


async def drain(cluster: Cluster, limit: float) -> None:
    """On SIGTERM: a node no longer among the members hands its keys off before it stops serving.

    A node still among them keeps its keys (on its data directory) for when it comes back.
    """
    cluster.membership.reload()
    handoff = cluster.handoff
    if cluster.node_id in cluster.topology.members:
        return
    log.info("nestkv draining: handing off this node's keys (up to %.0fs)", limit)
    sent = handoff.sent
    try:
        async with asyncio.timeout(limit):
            # Until a pass has covered the current list and nothing is left: a peer behind on the
            # list may still have sent it keys meanwhile.
            while True:
                await handoff.passed.wait()
                if handoff.holds_nothing():
                    break
                handoff.again()
    except TimeoutError:
        log.error("drain timed out after %.0fs: keys not handed off stay in the data directory", limit)
        return
    log.info("drain done: %d keys handed off", handoff.sent - sent)


async def announce_ready(health_servicer: Any, cluster: Cluster | None) -> None:
    """StoreService SERVING (readiness): at once for a single server; for a cluster node, once
    another member took its list, and with replicas while it is current (caught up, not
    stepping down). A node added to the list serves no clients before the
    existing nodes know of it, which would leave it and them each taking writes for the same
    keys; the first to know tells the others (nestkv.server.cluster.Cluster.heard_of)."""
    if cluster is not None and not cluster.handoff.known.is_set():
        log.info("StoreService not ready until another member takes this node's list")
        await cluster.handoff.known.wait()
        log.info("StoreService ready: a member took this node's list")
    replication = cluster.replication if cluster is not None else None
    if replication is None:
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return
    # With replicas, ready while current: a node catching up (or stepping down) answers for none
    # of its keys, and its callers are better sent to another node meanwhile.
    liveness = replication.liveness
    ready = None
    while True:
        if liveness.current != ready:
            ready = liveness.current
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await health_servicer.set(SERVICE_NAME, status)
        await wait_changed(liveness, INTERVAL)


def describe_cluster(cluster: Cluster | None) -> str:
    """`, node ID of N (version V)` for the ready line; nothing for a single server."""
    if cluster is None:
        return ""
    topology = cluster.topology
    return f", node {cluster.node_id} of {len(topology.members)} (members version {topology.version})"


def serve_health(config: ServerConfig, health_servicer: Any) -> tuple[Any, int]:
    """A second server, plaintext, with grpc.health.v1 alone: Kubernetes' gRPC probes speak no TLS."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(config.address(config.health_port))
    except RuntimeError as exc:
        raise SystemExit(
            f"nestkv: cannot serve health on {config.address(config.health_port)}: {exc}"
        ) from None
    return server, port


async def reap_forever(storage: NamespacedStorage, interval: float) -> None:
    """Active expiry: reclaim expired entries in bounded batches, yielding to requests in between."""
    while True:
        if storage.reap(_REAP_BATCH) < _REAP_BATCH:
            await asyncio.sleep(interval)
        else:
            await asyncio.sleep(0)


def open_storage(config: ServerConfig) -> NamespacedStorage:
    """The node's storage: its versions stamped with its id, and, in a cluster, where copies meet,
    its tombstones kept."""
    tombstones = Tombstones(config.tombstone_age, config.max_tombstones) if config.cluster else None
    return NamespacedStorage(
        max_memory=config.max_memory,
        eviction_policy=config.eviction_policy,
        versions=HybridClock(own_id(config.node_id) if config.cluster else ""),
        tombstones=tombstones,
    )


def open_persistence(config: ServerConfig, storage: NamespacedStorage) -> Persistence | None:
    """Lock and recover the data directory into `storage`; None when the server keeps no data on disk.

    In a cluster, a directory whose server stopped longer ago than --tombstone-age is refused:
    the other nodes may have forgotten deletes of keys it holds, which it would bring back.
    """
    if not config.data_dir:
        return None
    try:
        persistence = Persistence.open(Path(config.data_dir), config.fsync)
        persistence.recover(storage)
    except PersistenceError as error:
        raise SystemExit(f"nestkv: {error}") from None
    away = None if persistence.stopped_at is None else time.time() - persistence.stopped_at
    if config.cluster and storage.keys and away is not None and away > config.tombstone_age:
        persistence.close()
        raise SystemExit(
            f"nestkv: the data directory {config.data_dir} holds {storage.keys} keys, and its server "
            f"stopped {away:.0f} s ago, longer than --tombstone-age ({config.tombstone_age:.0f} s): "
            "the other nodes may have forgotten deletes of those keys, which this node would bring "
            "back. Move the directory away to start empty (keys only it held are lost), or start "
            f"with --tombstone-age above {away:.0f} to keep them, deletes or not"
        )
    return persistence


async def keep_clock_forever(clock: HybridClock) -> None:
    """Persist the version clock's bound every few seconds, even with nothing written: after a
    restart it tells until when this node ran (see open_persistence)."""
    while True:
        clock.keep_bound()
        await asyncio.sleep(seconds_of(BOUND_AHEAD) / 2)


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then let in-flight calls finish (up to the grace period)."""
    denials = Denials() if config.metrics_port is not None else None
    try:
        tls, gate = open_security(config, denials)
    except SecurityConfigError as error:
        raise SystemExit(f"nestkv: {error}") from None
    storage = open_storage(config)
    storage.quotas = gate.quotas
    persistence = open_persistence(config, storage)
    cluster = open_cluster(config, tls, gate, storage, persistence)
    metrics = OperationMetrics() if config.metrics_port is not None else None
    serving = build_server(config, storage, persistence, metrics, gate, cluster)
    server, health_servicer = serving.server, serving.health
    try:
        if tls is not None:
            port = server.add_secure_port(config.address(), tls.credentials)
        else:
            port = server.add_insecure_port(config.address())
    except RuntimeError as exc:
        # gRPC says only that it could not bind; with TLS, its BoringSSL may also refuse a key type.
        hint = (
            "is the port in use, or the TLS key of a type gRPC cannot use?" if tls else "is the port in use?"
        )
        raise SystemExit(f"nestkv: cannot listen on {config.address()}: {exc} ({hint})") from None
    health_server = None
    if config.health_port is not None:
        health_server, health_port = serve_health(config, serving.health)
    scraped = ""
    metrics_server = None
    if metrics is not None:  # before the store serves: a port in use stops the start cleanly
        assert config.metrics_port is not None
        if not is_loopback_host(config.metrics_host):
            log.warning(
                "metrics on %s are plain HTTP with no token: whoever reaches them sees each node's key "
                "count and memory, which Stats hides from tenants",
                config.metrics_host,
            )
        try:
            metrics_server, metrics_port = serve_metrics(
                config.metrics_host,
                config.metrics_port,
                StoreCollector(
                    metrics,
                    storage,
                    persistence,
                    denials,
                    cluster.replication if cluster is not None else None,
                ),
            )
        except OSError as error:
            where = config.address(config.metrics_port, config.metrics_host)
            raise SystemExit(f"nestkv: cannot serve metrics on {where}: {error}") from None
        scraped = f", metrics at http://{config.address(metrics_port, config.metrics_host)}/metrics"
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    ready = asyncio.create_task(announce_ready(health_servicer, cluster))
    if health_server is not None:
        await health_server.start()
        scraped += f", health at {config.address(health_port)}"
    background = [ready, asyncio.create_task(reap_forever(storage, config.reap_interval))]
    if cluster is not None:
        background.append(asyncio.create_task(cluster.membership.watch_forever()))
        background.append(asyncio.create_task(cluster.handoff.run_forever()))
        if cluster.replication is not None:
            background.append(asyncio.create_task(cluster.replication.liveness.ping_forever()))
            background.append(asyncio.create_task(cluster.replication.catch_up_forever()))
            background.append(asyncio.create_task(cluster.replication.count_roles_forever()))
    if persistence is not None:
        background.append(
            asyncio.create_task(persistence.snapshot_forever(storage, config.snapshot_interval))
        )
        if cluster is not None:
            background.append(asyncio.create_task(keep_clock_forever(storage.versions)))
        if persistence.fsync_policy == "everysec":
            background.append(asyncio.create_task(persistence.sync_forever()))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_security, tls, gate, storage)
    log.info(
        "nestkv serving on %s (version %s, event loop %s%s%s)",
        config.address(port),
        VERSION,
        type(loop).__module__,
        describe_security(tls, gate),
        describe_cluster(cluster) + scraped,
    )
    if gate.required and tls is None and not is_loopback_host(config.host):
        log.warning("tokens travel in plaintext to %s: add --tls-cert and --tls-key", config.host)

    await stop.wait()
    if cluster is not None:
        if cluster.replication is not None:
            await cluster.replication.step_down(serving.store.end_callers_streams)
        await drain(cluster, config.drain_timeout)
    grace = config.shutdown_grace
    if cluster is not None and cluster.replication is not None:
        # Stepped down: its callers went to other copies, and the client sends a call cut now
        # to one of them. Some calls were seen to linger past their callers' deadlines, holding
        # up the stop for the whole grace (a rolling restart took 10 s a node).
        grace = min(grace, STEPPED_DOWN_GRACE)
    log.info("nestkv stopping: finishing in-flight calls (grace %.1fs)", grace)
    # A periodic snapshot under way is cut short first: the one taken after the last call replaces it.
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await serving.stop(grace)
    if health_server is not None:
        await health_server.stop(None)
    if cluster is not None:
        await cluster.peers.close()
    if metrics_server is not None:
        await asyncio.to_thread(metrics_server.shutdown)
        metrics_server.server_close()
    if persistence is not None:
        try:
            entries = await persistence.snapshot(storage)
            log.info("snapshot of %d entries written to %s", entries, config.data_dir)
        except (PersistenceError, OSError) as error:
            log.error("final snapshot failed; the log still holds every write: %s", error)
        persistence.close()
    log.info("nestkv stopped")
