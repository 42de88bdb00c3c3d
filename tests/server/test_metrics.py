"""--metrics-port: /metrics scraped over HTTP from a real server process after known operations."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nestkv.client import GrpcStore, InvalidRequestError, StoreError
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.clusterproc import ClusterProcesses, free_ports
from tests.polling import eventually
from tests.serverproc import ServerProcess

_METRICS_AT = re.compile(r"metrics at (http://\S+/metrics)")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess) -> Samples:
    url = next(match[1] for line in server.log if (match := _METRICS_AT.search(line)))
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def operations(samples: Samples, operation: str, code: str = "OK") -> float:
    return samples.get(("nestkv_operations_total", (("code", code), ("operation", operation))), 0.0)


async def test_metrics_count_exactly_the_operations_done(tmp_path: Path) -> None:
    args = ("--metrics-port", "0", "--data-dir", str(tmp_path), "--snapshot-interval", "0.2")
    with ServerProcess(*args) as server:
        async with GrpcStore.with_client(server.target) as store:
            for i in range(3):
                await store.set(f"k{i}", b"v" * 100)
            await store.get("k0")
            await store.get("missing")
            await store.delete("k2")
            await store.exists("k1")
            await store.expires_in("k1")
            with pytest.raises(InvalidRequestError):
                await store.set("k" * 5000, b"v")
            await store.with_namespace("other").delete_all()
            await asyncio.gather(*(store.get(f"k{i}") for i in range(10)))  # one batch of 10
            async with grpc.aio.insecure_channel(server.target) as channel:  # a one-operation RPC
                await store_pb2_grpc.StoreServiceStub(channel).Get(pb.GetRequest(key="k1"))
            stats = await store.stats()
            await eventually(
                lambda: "nestkv_last_snapshot_age_seconds" in {name for name, _ in scrape(server)}
            )
            samples = scrape(server)
    assert operations(samples, "set") == 3
    assert operations(samples, "set", "INVALID_ARGUMENT") == 1
    assert operations(samples, "get") == 2 + 10 + 1
    assert operations(samples, "delete") == 1
    assert operations(samples, "exists") == 1
    assert operations(samples, "expires_in") == 1
    assert operations(samples, "delete_all") == 1
    assert samples["nestkv_operation_duration_seconds_count", (("operation", "get"),)] == 13
    assert samples["nestkv_operation_duration_seconds_count", (("operation", "set"),)] == 4
    assert samples["nestkv_operation_duration_seconds_sum", (("operation", "get"),)] > 0
    # Every Pipeline batch, in order: 3 sets, 2 gets, delete, exists, expires_in, the refused set,
    # delete_all (one operation each), then the batch of 10.
    caller = (("source", "caller"),)
    assert samples["nestkv_batch_operations_count", caller] == 11
    assert samples["nestkv_batch_operations_bucket", (("le", "8.0"), *caller)] == 10
    assert samples["nestkv_batch_operations_bucket", (("le", "16.0"), *caller)] == 11
    assert samples["nestkv_batch_operations_count", (("source", "replicas"),)] == 0
    assert samples["nestkv_batch_operations_count", (("source", "forwarded"),)] == 0
    assert samples["nestkv_keys", ()] == 2 == stats.server.keys
    assert samples["nestkv_memory_bytes", ()] == stats.server.memory_bytes
    assert samples["nestkv_max_memory_bytes", ()] == 0
    assert samples["nestkv_evictions_total", ()] == 0
    assert samples["nestkv_expired_keys_total", ()] == 0
    assert samples["nestkv_log_bytes", ()] >= 0
    assert 0 <= samples["nestkv_last_snapshot_age_seconds", ()] < 60


async def test_metrics_count_evictions_and_expirations() -> None:
    with ServerProcess(
        "--metrics-port", "0", "--max-memory", "1M", "--eviction-policy", "allkeys-lru"
    ) as server:
        async with GrpcStore.with_client(server.target) as store:
            await store.set_many({f"brief{i}": b"v" for i in range(5)}, expires_in=1)
            await asyncio.sleep(1.5)
            await store.set_many({f"big{i}": b"v" * 1000 for i in range(2000)})
            stats = await store.stats()
        samples = scrape(server)
    assert samples["nestkv_expired_keys_total", ()] == 5
    assert samples["nestkv_evictions_total", ()] == stats.server.evictions > 0
    assert samples["nestkv_max_memory_bytes", ()] == 1024 * 1024


def test_a_metrics_port_in_use_stops_the_start_with_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "nestkv.server", "--port", "0", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(f"nestkv: cannot serve metrics on 127.0.0.1:{port}:")
    assert done.stderr.count("\n") == 1, done.stderr


def test_without_the_flag_nothing_listens_for_metrics() -> None:
    with ServerProcess() as server:
        assert not [line for line in server.log if "metrics at" in line]


def test_json_logs_are_one_object_a_line_and_never_one_per_operation() -> None:
    with ServerProcess("--log-format", "json") as server:

        async def work() -> None:
            async with GrpcStore.with_client(server.target) as store:
                await store.set_many({f"k{i}": b"v" for i in range(100)})

        asyncio.run(work())
    lines = [json.loads(line) for line in server.log]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    # RFC 3339 with its time zone (UTC), to the millisecond: 2026-12-07T21:50:12.345Z
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0]["time"]), lines[0]["time"]
    assert lines[0]["message"].startswith("nestkv serving on 127.0.0.1:")
    assert lines[-1]["message"] == "nestkv stopped"
    assert len(lines) <= 4  # serving, stopping, stopped: nothing per operation


async def test_a_cluster_node_reports_its_tombstones() -> None:
    [port] = free_ports(1)
    cluster = ("--port", str(port), "--node-id", "a", "--cluster", f"a=127.0.0.1:{port}")
    with ServerProcess("--metrics-port", "0", *cluster, "--max-tombstones", "3") as server:
        async with GrpcStore.with_client(server.target) as store:
            for number in range(3):
                await store.delete(f"gone{number}")
            with pytest.raises(StoreError, match="removes nothing here") as refused:
                await store.delete("gone3")  # a fourth tombstone: over --max-tombstones
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            await store.set("held", b"v")
            await store.delete("held")  # removes a value: never refused
        samples = scrape(server)
    assert samples["nestkv_tombstones", ()] == 4
    assert samples["nestkv_tombstone_bytes", ()] > 0
    assert samples["nestkv_memory_bytes", ()] >= samples["nestkv_tombstone_bytes", ()]
    assert samples["nestkv_memory_over_bytes", ()] == 0


async def test_a_single_server_keeps_no_tombstones() -> None:
    with ServerProcess("--metrics-port", "0") as server:
        async with GrpcStore.with_client(server.target) as store:
            await store.delete("gone")
        samples = scrape(server)
    assert ("nestkv_tombstones", ()) not in samples


async def test_a_node_with_replicas_reports_its_keys_by_role_and_its_replication_failures(
    tmp_path: Path,
) -> None:
    with ClusterProcesses(tmp_path, 2, "--replicas", "2", "--metrics-port", "0") as cluster:
        for node in cluster.nodes.values():
            await node.ready()
        async with GrpcStore.with_client(cluster.target("node-0"), timeout=5) as store:
            await store.set_many({f"k{number}": b"v" for number in range(100)})
        sent_to_node_0 = scrape(cluster.nodes["node-0"])
        cluster.nodes["node-1"].stop()
        cluster.nodes["node-1"] = cluster.node("node-1").start()  # counts its keys as it starts
        node = cluster.nodes["node-1"]
        await eventually(lambda: scrape(node).get(("nestkv_keys_by_role", (("role", "replica"),)), 0) > 0)
        samples = scrape(node)
        async with GrpcStore.with_client(cluster.target("node-1"), timeout=5) as store:
            stats = await store.stats()
    first, replica, others = (
        samples["nestkv_keys_by_role", (("role", role),)]
        for role in ("first_copy", "replica", "held_for_others")
    )
    # Two nodes, two copies: node-1 holds every key, as the first copy of about half.
    assert (first + replica, others) == (100, 0)
    assert 20 < first < 80
    assert samples["nestkv_replication_failures_total", ()] == 0
    assert stats.server.keys_first_copy + stats.server.keys_replica >= 100
    # node-0 took the writes of its keys from the client, and copies of node-1's from node-1, each
    # batch counted by who sent it: what a client's batch costs in messages between the nodes.
    from_node_1 = (("source", "replicas"),)
    batches = sent_to_node_0["nestkv_batch_operations_count", from_node_1]
    replicas = sent_to_node_0["nestkv_batch_operations_sum", from_node_1]
    assert 0 < batches <= replicas == operations(sent_to_node_0, "replica")
    assert 100 - replicas <= sent_to_node_0["nestkv_batch_operations_sum", (("source", "caller"),)] <= 100
