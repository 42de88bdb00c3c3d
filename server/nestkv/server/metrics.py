"""Prometheus metrics: what operators scrape at /metrics, as etcd's and Redis exporters' figures.

Counting happens on the event loop in plain Python counters (`OperationMetrics`),
a dict increment and a list increment per operation; prometheus-client only
reads them, from its HTTP server's thread, when scraped. Names follow the
Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` counters.

    nestkv_operations_total{operation, code}        counter: operations by kind and gRPC status name
    nestkv_operation_duration_seconds{operation}    histogram: time the server spent on one operation
    nestkv_batch_operations{source}                 histogram: operations per Pipeline batch, by who
                                                   sent it: "caller" (a client), "replicas" (another
                                                   node's copies of its writes), "forwarded" (another
                                                   node's operations on keys held here)
    nestkv_keys, nestkv_memory_bytes,               gauges: the store (memory as --max-memory counts it)
      nestkv_max_memory_bytes, nestkv_memory_over_bytes   and what copies of other nodes' writes hold
                                                   over it when nothing could be evicted for them
    nestkv_evictions_total, nestkv_expired_keys_total   counters
    nestkv_tombstones, nestkv_tombstone_bytes    in a cluster, gauges: deletes remembered, and
                                                 their memory (within --max-memory and quotas)
    nestkv_log_bytes, nestkv_last_snapshot_age_seconds  gauges, with --data-dir
    nestkv_auth_denials_total{token, reason}       counter: calls and operations refused, by token
                                                   name ("" if none) and reason (missing_token,
                                                   unknown_token, ambiguous_token, read_only)
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nestkv.server.cluster.replication import Replication
    from nestkv.server.storage import NamespacedStorage
    from nestkv.server.storage.persistence import Persistence

OPERATIONS = ("set", "get", "delete", "delete_all", "exists", "expires_in", "increment", "replica")
DURATION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2, 0.1, 1.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0)
BATCH_SOURCES = ("caller", "replicas", "forwarded")


class Histogram:
    """Counts per bucket (upper bounds `bounds`, then +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """Cumulative buckets (upper bound, count at or below it; the last bound inf) and the sum."""
        counts, total = list(self.counts), self.sum
        buckets, running = [], 0
        for bound, count in zip([*self.bounds, math.inf], counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, total


class OperationMetrics:
    """What the servicer counts: operations by kind and status, their durations, batch sizes."""

    __slots__ = ("batch_sizes", "counts", "durations", "forwarded", "ok")

    def __init__(self) -> None:
        self.ok = {operation: (operation, "OK") for operation in OPERATIONS}
        """The counts' key of each operation's success, made once: the hot path allocates nothing."""
        self.counts: dict[tuple[str, str], int] = dict.fromkeys(self.ok.values(), 0)
        self.durations = {operation: Histogram(DURATION_BUCKETS) for operation in OPERATIONS}
        self.batch_sizes = {source: Histogram(BATCH_BUCKETS) for source in BATCH_SOURCES}
        """Operations per batch received, by who sent it (BATCH_SOURCES): with replicas, what a
        client's batch costs in messages between the nodes."""
        self.forwarded: dict[str, int] = {}
        """Operations sent on to the member that owns their key, by member (counted there too)."""

    def succeeded(self, operation: str, seconds: float) -> None:
        """`record(operation, "OK", seconds)` without building the key: the common case, per operation."""
        self.counts[self.ok[operation]] += 1
        self.durations[operation].observe(seconds)

    def record(self, operation: str, code: str, seconds: float) -> None:
        """One operation, with the status its caller got and the server's time on it."""
        key = (operation, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.durations[operation].observe(seconds)

    def recount(self, operation: str, counted: str, code: str) -> None:
        """An operation counted with status `counted` ended with `code` after all (its batch failed)."""
        self.counts[operation, counted] -= 1
        key = (operation, code)
        self.counts[key] = self.counts.get(key, 0) + 1


class Denials:
    """Calls and operations refused for want of a valid token or of access, by token name and reason."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def count(self, token: str, reason: str) -> None:
        key = (token, reason)
        self.counts[key] = self.counts.get(key, 0) + 1


class StoreCollector:
    """The prometheus-client collector of a server: reads the counters and the store when scraped."""

    def __init__(
        self,
        operations: OperationMetrics,
        storage: NamespacedStorage,
        persistence: Persistence | None,
        denials: Denials | None = None,
        replication: Replication | None = None,
    ) -> None:
        self._operations = operations
        self._replication = replication
        self._storage = storage
        self._persistence = persistence
        self._denials = denials

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def buckets_of(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
            buckets, total = histogram.cumulative()
            return [("+Inf" if bound == math.inf else repr(bound), count) for bound, count in buckets], total

        operations = CounterMetricFamily(
            "nestkv_operations", "Operations by kind and gRPC status code.", labels=["operation", "code"]
        )
        for (operation, code), count in self._operations.counts.copy().items():
            operations.add_metric([operation, code], count)
        yield operations
        durations = HistogramMetricFamily(
            "nestkv_operation_duration_seconds",
            "Time the server spent on one operation, from parsed request to filled response.",
            labels=["operation"],
        )
        for operation, histogram in self._operations.durations.items():
            durations.add_metric([operation], *buckets_of(histogram))
        yield durations
        batches = HistogramMetricFamily(
            "nestkv_batch_operations",
            "Operations per Pipeline batch, by sender: a caller, or another node (replicas, forwarded).",
            labels=["source"],
        )
        for source, histogram in self._operations.batch_sizes.items():
            batches.add_metric([source], *buckets_of(histogram))
        yield batches
        forwarded = CounterMetricFamily(
            "nestkv_forwarded_operations",
            "Operations sent on to the cluster member that owns their key (delete_all: to every member).",
            labels=["node"],
        )
        for node, count in self._operations.forwarded.copy().items():
            forwarded.add_metric([node], count)
        yield forwarded
        if self._denials is not None:
            denied = CounterMetricFamily(
                "nestkv_auth_denials",
                "Calls and operations refused for want of a valid token or of access.",
                labels=["token", "reason"],
            )
            for (token, reason), count in self._denials.counts.copy().items():
                denied.add_metric([token, reason], count)
            yield denied
        storage = self._storage
        yield GaugeMetricFamily(
            "nestkv_keys", "Keys held, expired keys not yet reclaimed included.", storage.keys
        )
        yield GaugeMetricFamily(
            "nestkv_memory_bytes", "Bytes the keys take as --max-memory counts them.", storage.used_memory
        )
        yield GaugeMetricFamily(
            "nestkv_max_memory_bytes", "The --max-memory bound; 0: none.", storage.max_memory
        )
        yield GaugeMetricFamily(
            "nestkv_memory_over_bytes",
            "Bytes over --max-memory held by copies of writes admitted on other nodes (never refused).",
            storage.over_memory,
        )
        yield CounterMetricFamily(
            "nestkv_evictions", "Keys evicted to stay within --max-memory.", storage.evictions
        )
        yield CounterMetricFamily(
            "nestkv_expired_keys", "Keys reclaimed after they expired.", storage.expired
        )
        tombstones = storage.tombstones
        if tombstones is not None:
            yield GaugeMetricFamily(
                "nestkv_tombstones", "Deletes remembered so that older copies do not return.", len(tombstones)
            )
            yield GaugeMetricFamily(
                "nestkv_tombstone_bytes", "Bytes the tombstones take, within --max-memory.", tombstones.bytes
            )
        replication = self._replication
        if replication is not None:
            roles = GaugeMetricFamily(
                "nestkv_keys_by_role",
                "Keys held as their first copy, another copy, or neither (held for others), as last counted.",
                labels=["role"],
            )
            for role, count in replication.roles.items():
                roles.add_metric([role], count)
            yield roles
            yield CounterMetricFamily(
                "nestkv_replication_failures",
                "Replicas sent that a copy or stand-in did not store (no answer in time, or a failure).",
                replication.failures,
            )
        if self._persistence is not None:
            yield GaugeMetricFamily(
                "nestkv_log_bytes",
                "Bytes of the logs not yet covered by a snapshot.",
                self._persistence.log_bytes(),
            )
            last = self._persistence.last_snapshot
            if last is not None:
                yield GaugeMetricFamily(
                    "nestkv_last_snapshot_age_seconds",
                    "Seconds since the last complete snapshot was written.",
                    max(0.0, time.time() - last),
                )


def serve_metrics(host: str, port: int, collector: StoreCollector) -> tuple[Any, int]:
    """Serve /metrics on `host`:`port` (0: a free port) from a thread; the HTTP server and its port."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    return httpd, int(httpd.server_port)
