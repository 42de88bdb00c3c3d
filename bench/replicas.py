"""`python -m bench.replicas` (`make bench`): what --replicas 2 costs against 1, and how fast it fails over.

Two clusters of 3 in-memory nodes (plaintext, 127.0.0.1), one with
`--replicas 1` and one with `--replicas 2`, run side by side and measured in
interleaved rounds, so that a slow spell of the machine hits both alike:

* ops/s of `--tasks` tasks (80% get / 20% set, 100-byte values, random keys
  of a preloaded key space) through one routing `GrpcStore`, the best round;
* write latency p50 (a `set`'s time as its caller sees it), over all rounds;
* server CPU per write: utime + stime of every node (from /proc) per
  operation, over all rounds, for a write-only run of the same tasks (the goal:
  R=2 at most 2.2x R=1);
* messages between the nodes, from their metrics (`nestkv_batch_operations`
  by source), over the mixed runs: batches of replicas the nodes received per
  batch from the client, and the operations in each (what a replicated write
  costs is mostly these messages: on this machine a message costs several
  times what an operation in it does);
* failover: with the R=2 cluster under reads of one node's keys, the time from
  kill -9 of that node to the first successful read of its keys, and to the
  point from which every read succeeds (best and worst of `--kills`); the same
  for a pause (SIGSTOP) of the node, resumed 4 s later;
* Redis Cluster, where `redis-server` is installed: 3 masters, and 3 masters
  with a replica each (`redis-cli --cluster create --cluster-replicas 1`;
  asynchronous replicas), under the same workload through redis-py's
  `RedisCluster` (hiredis when installed), in the same interleaved rounds.

Every figure is also given as a ratio against R=1 of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.__main__ import TTL, VALUE, commit, machine
from bench.cluster import cpu_seconds, samples
from bench.output import publish
from bench.servers import RedisCluster, redis_cluster
from nestkv.client import GrpcStore, StoreError
from nestkv.wire.placement import Placement
from tests.clusterproc import ClusterProcesses

NAMESPACE = "bench"
REDIS_CLUSTERS = {"Redis Cluster, 3 masters": 0, "Redis Cluster, 3 masters + 3 replicas": 1}
GET_FRACTION = 0.8
Row = dict[str, Any]


Get = Callable[[str], Awaitable[Any]]
Put = Callable[[str], Awaitable[Any]]


async def workload(
    store: GrpcStore, tasks: int, seconds: float, keys: int, get_fraction: float
) -> tuple[int, list[float]]:
    """Operations done in `seconds` by `tasks` tasks, and each write's latency."""

    async def put(key: str) -> None:
        await store.set(key, VALUE, expires_in=TTL)

    return await mixed(store.get, put, tasks, seconds, [f"key{n}" for n in range(keys)], get_fraction)


async def redis_workload(
    client: Any, tasks: int, seconds: float, keys: int, get_fraction: float
) -> tuple[int, list[float]]:
    """`workload`, through a RedisCluster client."""

    async def put(key: str) -> None:
        await client.set(key, VALUE, ex=TTL)

    names = [f"{NAMESPACE}:key{n}" for n in range(keys)]
    return await mixed(client.get, put, tasks, seconds, names, get_fraction)


async def mixed(
    get: Get, put: Put, tasks: int, seconds: float, keys: Sequence[str], get_fraction: float
) -> tuple[int, list[float]]:
    """`get` or `put` random `keys` (`get_fraction` of them gets) from `tasks` tasks for `seconds`:
    how many, and each put's latency."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker(rng: random.Random) -> int:
        done = 0
        while time.monotonic() < deadline:
            key = rng.choice(keys)
            if rng.random() < get_fraction:
                await get(key)
            else:
                started = time.perf_counter()
                await put(key)
                latencies.append(time.perf_counter() - started)
            done += 1
        return done

    counts = await asyncio.gather(*(worker(random.Random(n)) for n in range(tasks)))
    return sum(counts), latencies


async def measure_redis(cluster: Any, args: argparse.Namespace, get_fraction: float) -> Row:
    client = cluster.client()
    try:
        await redis_workload(client, args.tasks, 0.5, args.keys, get_fraction)  # warm: slots, connections
        started = time.monotonic()
        operations, latencies = await redis_workload(
            client, args.tasks, args.seconds, args.keys, get_fraction
        )
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    return {"operations": operations, "ops_per_s": operations / elapsed, "latencies": latencies}


def batches(cluster: ClusterProcesses) -> dict[str, float]:
    """The Pipeline batches the nodes received so far, and the operations in them, by who sent them:
    "caller", "replicas" (`_operations` for the operations)."""
    totals: dict[str, float] = {}
    for node in cluster.nodes.values():
        for sample in samples(node):
            if sample.name in ("nestkv_batch_operations_count", "nestkv_batch_operations_sum"):
                figure = sample.labels["source"] + ("_operations" if sample.name.endswith("sum") else "")
                totals[figure] = totals.get(figure, 0.0) + sample.value
    return totals


async def measure(cluster: ClusterProcesses, args: argparse.Namespace, get_fraction: float) -> Row:
    async with GrpcStore.with_client(cluster.target()) as root:
        store = root.with_namespace(NAMESPACE)
        await workload(store, args.tasks, 0.5, args.keys, get_fraction)  # warm: topology, channels
        pids = [node.process.pid for node in cluster.nodes.values()]
        received = batches(cluster)
        cpu = sum(cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        operations, latencies = await workload(store, args.tasks, args.seconds, args.keys, get_fraction)
        elapsed = time.monotonic() - started
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu
        received = {figure: count - received.get(figure, 0.0) for figure, count in batches(cluster).items()}
    return {
        "operations": operations,
        "ops_per_s": operations / elapsed,
        "cpu_s": cpu,
        "latencies": latencies,
        "batches": received,
    }


async def failover(
    cluster: ClusterProcesses, victim: str, signum: int = signal.SIGKILL
) -> tuple[float, float]:
    """Seconds from kill -9 of `victim` (or `signum`: SIGSTOP, resumed 4 s later) to the first
    successful read of its keys begun after it, and to the last failed one (from then on every
    read succeeds), under 16 readers of its keys."""
    placement = Placement(list(cluster.ports))
    keys = [key for key in (f"key{n}" for n in range(2_000)) if placement.owner((NAMESPACE,), key) == victim]
    async with GrpcStore.with_client(
        cluster.target("node-0" if victim != "node-0" else "node-1"), timeout=2
    ) as root:
        store = root.with_namespace(NAMESPACE)
        await store.set_many(dict.fromkeys(keys, VALUE))
        first_success = 0.0
        last_failure = 0.0
        killed = asyncio.Event()
        stop = asyncio.Event()
        killed_at = 0.0

        async def reader(rng: random.Random) -> None:
            nonlocal first_success, last_failure
            while not stop.is_set():
                began = time.monotonic()
                try:
                    await store.get(rng.choice(keys))
                except StoreError:
                    last_failure = max(last_failure, time.monotonic())
                    continue
                if killed.is_set() and began >= killed_at and not first_success:
                    first_success = time.monotonic()

        readers = [asyncio.create_task(reader(random.Random(n))) for n in range(16)]
        await asyncio.sleep(1)
        killed_at = time.monotonic()
        cluster.nodes[victim].process.send_signal(signum)
        killed.set()
        await asyncio.sleep(4)
        if signum == signal.SIGSTOP:
            cluster.nodes[victim].process.send_signal(signal.SIGCONT)
        stop.set()
        await asyncio.gather(*readers)
    if signum == signal.SIGKILL:
        await asyncio.to_thread(cluster.nodes[victim].process.wait)
    return first_success - killed_at, max(last_failure - killed_at, 0.0)


async def run(args: argparse.Namespace) -> Row:
    began = time.perf_counter()
    rows: dict[int, dict[str, list[Any]]] = {1: {}, 2: {}}
    received: dict[int, dict[str, float]] = {1: {}, 2: {}}  # batches the nodes received, over the mixed runs
    redis_rows: dict[str, dict[str, list[Any]]] = {}
    redis_skipped = ""
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        clusters = {}
        for replicas in rows:
            place = Path(directory) / f"r{replicas}"
            place.mkdir()
            clusters[replicas] = ClusterProcesses(
                place, 3, "--replicas", str(replicas), "--metrics-port", "0", data=False
            ).start()
        redis_clusters = {}
        for name, replicas in REDIS_CLUSTERS.items():
            made = stack.enter_context(redis_cluster(Path(directory), 3, replicas)) if args.redis else None
            if not isinstance(made, RedisCluster):
                redis_skipped = made or "--no-redis"
                break
            redis_clusters[name] = made
            redis_rows[name] = {}
        try:
            for cluster in clusters.values():
                for node in cluster.nodes.values():
                    await node.ready()
            for number in range(args.rounds):
                for replicas, cluster in clusters.items():
                    print(f"  round {number + 1}: R={replicas} ...", flush=True)
                    mixed_run = await measure(cluster, args, GET_FRACTION)
                    writes = await measure(cluster, args, 0.0)
                    row = rows[replicas]
                    row.setdefault("ops_per_s", []).append(mixed_run["ops_per_s"])
                    row.setdefault("latencies", []).extend(mixed_run["latencies"])
                    row.setdefault("write_cpu", []).append(writes["cpu_s"] / writes["operations"])
                    for figure, count in mixed_run["batches"].items():
                        received[replicas][figure] = received[replicas].get(figure, 0.0) + count
                for name, redis in redis_clusters.items():
                    print(f"  round {number + 1}: {name} ...", flush=True)
                    mixed_run = await measure_redis(redis, args, GET_FRACTION)
                    redis_rows[name].setdefault("ops_per_s", []).append(mixed_run["ops_per_s"])
                    redis_rows[name].setdefault("latencies", []).extend(mixed_run["latencies"])
            kills, pauses = [], []
            for number in range(args.kills):
                victim = f"node-{number % 3}"
                print(f"  kill -9 {victim} (R=2) ...", flush=True)
                kills.append(await failover(clusters[2], victim))
                clusters[2].nodes[victim] = clusters[2].node(victim).start()
                await clusters[2].nodes[victim].ready()
                print(f"  SIGSTOP {victim} (R=2) ...", flush=True)
                pauses.append(await failover(clusters[2], victim, signal.SIGSTOP))
                await clusters[2].nodes[victim].ready()
        finally:
            for cluster in clusters.values():
                cluster.stop()
    summary = {
        replicas: {
            "ops_per_s": max(row["ops_per_s"]),
            "write_p50_ms": statistics.median(row["latencies"]) * 1000,
            "server_cpu_per_write_us": statistics.median(row["write_cpu"]) * 1e6,
        }
        for replicas, row in rows.items()
    }
    ratios = {name: summary[2][name] / summary[1][name] for name in summary[1]}
    for replicas, counts in received.items():
        client_batches = max(counts.get("caller", 0.0), 1.0)
        replica_batches = counts.get("replicas", 0.0)
        figures = summary[replicas]
        figures["operations_per_client_batch"] = counts.get("caller_operations", 0.0) / client_batches
        figures["replica_batches_per_client_batch"] = replica_batches / client_batches
        figures["operations_per_replica_batch"] = (
            counts.get("replicas_operations", 0.0) / replica_batches if replica_batches else 0.0
        )
    redis_figures = {
        name: {
            "ops_per_s": max(row["ops_per_s"]),
            "write_p50_ms": statistics.median(row["latencies"]) * 1000,
        }
        for name, row in redis_rows.items()
    }
    return {
        "machine": machine(),
        "commit": commit(),
        "settings": {"tasks": args.tasks, "seconds": args.seconds, "keys": args.keys, "rounds": args.rounds},
        "replicas_1": summary[1],
        "replicas_2": summary[2],
        "ratio_2_to_1": ratios,
        "redis_cluster": redis_figures,
        **({"redis_cluster_skipped": redis_skipped} if redis_skipped else {}),
        "failover_first_success_s": [first for first, _ in kills],
        "failover_all_succeed_s": [last for _, last in kills],
        "pause_first_success_s": [first for first, _ in pauses],
        "pause_all_succeed_s": [last for _, last in pauses],
        "wall_s": time.perf_counter() - began,
    }


def report(results: Row) -> str:
    one, two, ratio = results["replicas_1"], results["replicas_2"], results["ratio_2_to_1"]
    lines = [
        f"3 nodes, {results['settings']['tasks']} tasks  R=1                 R=2                 R=2 / R=1",
        f"ops/s (80% get)        {one['ops_per_s']:>10,.0f}          {two['ops_per_s']:>10,.0f}"
        f"          {ratio['ops_per_s']:.2f}x",
        f"write p50              {one['write_p50_ms']:>10.2f} ms       {two['write_p50_ms']:>10.2f} ms"
        f"       {ratio['write_p50_ms']:.2f}x",
        f"server CPU per write   {one['server_cpu_per_write_us']:>10.0f} us       "
        f"{two['server_cpu_per_write_us']:>10.0f} us       {ratio['server_cpu_per_write_us']:.2f}x",
        f"ops per client batch   {one['operations_per_client_batch']:>10.1f}          "
        f"{two['operations_per_client_batch']:>10.1f}",
        f"replica batches per client batch {two['replica_batches_per_client_batch']:.2f} (R=2), "
        f"{two['operations_per_replica_batch']:.1f} ops each",
    ]
    for name, row in results["redis_cluster"].items():
        lines.append(
            f"{name:<37}{row['ops_per_s']:>10,.0f} ops/s, write p50 {row['write_p50_ms']:.2f} ms; "
            f"R=2 / it: {two['ops_per_s'] / row['ops_per_s']:.2f}x ops/s"
        )
    if "redis_cluster_skipped" in results:
        lines.append(f"Redis Cluster rows skipped: {results['redis_cluster_skipped']}")
    for fault, key in (("kill -9", "failover"), ("SIGSTOP", "pause")):
        first, every = results[f"{key}_first_success_s"], results[f"{key}_all_succeed_s"]
        if first:
            lines.append(
                f"{fault} to the first successful read of its keys (R=2): {min(first):.2f}-"
                f"{max(first):.2f} s; to every read succeeding: {min(every):.2f}-{max(every):.2f} s"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks of the client")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--keys", type=int, default=10_000, help="key space of the workload")
    parser.add_argument("--kills", type=int, default=3, help="nodes killed one after another (R=2)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument(
        "--no-redis", dest="redis", action="store_false", help="leave out the Redis Cluster rows"
    )
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    publish(results, report(results), args.json)


if __name__ == "__main__":
    main()
