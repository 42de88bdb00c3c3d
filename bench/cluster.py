"""`python -m bench.cluster` (`make bench`): what a cluster of nodes on this machine gives and costs.

Every figure is measured in one run and reported as a ratio against a
baseline of the same run (the machines are shared and noisy):

* scaling: clusters of 1, 2 and 3 in-memory nodes (plaintext, 127.0.0.1),
  started side by side, each driven by as many client processes as it has
  nodes. Each client process runs `--tasks` tasks of 80% get / 20% set
  (100-byte values with a TTL) on random keys of a preloaded key space,
  through `GrpcStore.with_client(node-0)`, which sends each operation to its
  key's owner. ops/s (all clients together) and server CPU per operation
  (utime + stime of every node from /proc, over the operations of every
  client), against the cluster of 1 node.
* forwarding: the same workload on the largest cluster through clients
  pinned to node-0 (`GrpcStore` on a channel of their own, which does not
  route: node-0 forwards what it does not own), against the topology-aware
  clients on that cluster.
* restart: a node with `--data-dir` loaded with `--restart-keys` keys
  (21-byte keys, 100-byte values) through set_many, stopped with SIGTERM
  (it writes a snapshot), then timed from spawning it again to its ready
  line, against the start of the same node when it was empty.

Also, from each node's metrics (`--metrics-port`): the operations per
Pipeline batch that the nodes received, and the share of the clients'
operations that a node forwarded to their owner.

Rounds are interleaved (each setup once per round) so that a slow spell of
the machine hits every setup alike; ops/s is the best round (noise only
ever slows a round down), the other figures are over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.__main__ import TTL, VALUE, commit, load_nestkv, machine, nestkv_keys
from bench.output import publish
from nestkv.client import GrpcStore, channel_options
from tests.clusterproc import ClusterProcesses
from tests.serverproc import ServerProcess

NAMESPACE = "bench"
GET_FRACTION = 0.8
WARM_UP_S = 0.5
TOPOLOGY_AWARE = "topology-aware"
PINNED = "pinned to node-0"
RECOVERED = re.compile(r"recovered (\d+) entries from the snapshot and (\d+) log records")
METRICS_AT = re.compile(r"metrics at (http://\S+/metrics)")
Row = dict[str, Any]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc (Linux)."""
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def samples(node: ServerProcess) -> Iterator[Any]:
    """Every sample of a node's metrics (started with `--metrics-port`), scraped now."""
    url = next(match[1] for line in node.log if (match := METRICS_AT.search(line)))
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        yield from family.samples


def counters(node: ServerProcess) -> list[float]:
    """A node's Pipeline batches received, the operations in them, and the operations it forwarded."""
    names = [
        "nestkv_batch_operations_count",
        "nestkv_batch_operations_sum",
        "nestkv_forwarded_operations_total",
    ]
    totals = [0.0, 0.0, 0.0]
    for sample in samples(node):
        if sample.name in names:
            # Batches: one sample per sender (a caller, another node); forwarded: one per owner.
            totals[names.index(sample.name)] += sample.value
    return totals


# --- the client processes ---------------------------------------------------------------------------


async def workload(store: GrpcStore, tasks: int, seconds: float, keys: int, seed: int) -> int:
    """`tasks` tasks of mixed gets and sets until `seconds` have passed: the operations done."""
    deadline = time.monotonic() + seconds

    async def worker(rng: random.Random) -> int:
        done = 0
        while time.monotonic() < deadline:
            key = f"key{rng.randrange(keys)}"
            if rng.random() < GET_FRACTION:
                await store.get(key)
            else:
                await store.set(key, VALUE, expires_in=TTL)
            done += 1
        return done

    return sum(await asyncio.gather(*(worker(random.Random(seed * 1_000 + n)) for n in range(tasks))))


async def client(target: str, pinned: bool, settings: Row, seed: int, ready: Any, go: Any) -> Row:
    channel = grpc.aio.insecure_channel(target, options=channel_options()) if pinned else None
    root = GrpcStore(channel) if channel is not None else GrpcStore.with_client(target)
    store = root.with_namespace(NAMESPACE)
    try:
        # Opens the channels and, for a routing store, reads the topology before the clock starts.
        await workload(store, settings["tasks"], WARM_UP_S, settings["keys"], seed)
        routed = root._connection.every_node()[1]  # None: the store sends everything to node-0
        ready.put(None)
        if not await asyncio.to_thread(go.wait, 120):
            raise TimeoutError("no go from the bench within 120 s")
        cpu, started = time.process_time(), time.monotonic()
        operations = await workload(store, settings["tasks"], settings["seconds"], settings["keys"], seed)
        ended = time.monotonic()
        return {
            "operations": operations,
            "started": started,
            "ended": ended,
            "cpu_s": time.process_time() - cpu,
            "routed_nodes": len(routed or ()),
        }
    finally:
        await root.close()
        if channel is not None:
            await channel.close()


def client_process(
    target: str, pinned: bool, settings: Row, seed: int, ready: Any, go: Any, out: Any
) -> None:
    """A client process (spawned: it shares no gRPC state with the bench): its figures, or its error."""
    try:
        out.put(asyncio.run(client(target, pinned, settings, seed, ready, go)))
    except BaseException as error:
        ready.put(None)  # the bench must not wait for a ready that will never come
        out.put({"error": f"{type(error).__name__}: {error}"})


def name(pinned: bool) -> str:
    return PINNED if pinned else TOPOLOGY_AWARE


def measure(cluster: ClusterProcesses, pinned: bool, settings: Row, seed: int) -> Row:
    """One round of one setup: as many client processes as nodes, started together once all are warm."""
    context = multiprocessing.get_context("spawn")  # not fork: the bench process runs gRPC threads
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    nodes = list(cluster.nodes.values())
    processes = [
        context.Process(
            target=client_process,
            args=(cluster.target(), pinned, settings, seed * 100 + n, ready, go, out),
            daemon=True,
        )
        for n in range(len(nodes))
    ]
    try:
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=120)
        before = [counters(node) for node in nodes]
        cpu_before = sum(cpu_seconds(node.process.pid) for node in nodes)
        go.set()
        results = [out.get(timeout=settings["seconds"] + 120) for _ in processes]
        cpu = sum(cpu_seconds(node.process.pid) for node in nodes) - cpu_before
        after = [counters(node) for node in nodes]
    finally:
        go.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
    errors = [result["error"] for result in results if "error" in result]
    if errors:
        raise RuntimeError(f"client processes failed: {errors}")
    if not pinned and any(result["routed_nodes"] != len(nodes) for result in results):
        raise RuntimeError(f"a topology-aware client did not learn the {len(nodes)} nodes: {results}")
    operations = sum(result["operations"] for result in results)
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    batches, batched, forwarded = (
        sum(a[i] - b[i] for a, b in zip(after, before, strict=True)) for i in range(3)
    )
    return {
        "operations": operations,
        "ops_per_s": operations / elapsed,
        "server_cpu_s": cpu,
        "client_cpu_s": sum(result["cpu_s"] for result in results),
        "batches": batches,
        "batched_operations": batched,
        "forwarded": forwarded,
    }


# --- throughput: scaling and forwarding ----------------------------------------------------------------


@contextlib.contextmanager
def clusters(directory: Path, sizes: Sequence[int]) -> Iterator[dict[int, ClusterProcesses]]:
    """In-memory clusters of each size, all running side by side, with metrics (batches, forwarding)."""
    with contextlib.ExitStack() as stack:
        running = {}
        for size in sizes:
            (directory / f"{size}-nodes").mkdir()
            running[size] = stack.enter_context(
                ClusterProcesses(directory / f"{size}-nodes", size, "--metrics-port", "0", data=False)
            )
        yield running


async def preload(target: str, keys: int) -> None:
    async with GrpcStore.with_client(target, timeout=60) as root:
        await root.with_namespace(NAMESPACE).set_many(
            [(f"key{i}", VALUE) for i in range(keys)], expires_in=TTL
        )


async def throughput(sizes: Sequence[int], settings: Row, rounds: int) -> tuple[list[Row], list[str]]:
    """Rows per setup (scaling on each size, then pinned on the largest), and the nodes' log problems."""
    with tempfile.TemporaryDirectory() as directory, clusters(Path(directory), sizes) as running:
        for cluster in running.values():
            await preload(cluster.target(), settings["keys"])
        setups = [(size, False) for size in sizes] + [(max(sizes), True)]
        measured: dict[tuple[int, bool], list[Row]] = {setup: [] for setup in setups}
        for round_number in range(rounds):
            for size, pinned in setups:
                # In a thread: its waits block for seconds, and this loop runs the bench's gRPC channels.
                row = await asyncio.to_thread(measure, running[size], pinned, settings, round_number)
                measured[size, pinned].append(row)
                print(
                    f"  round {round_number + 1}: {size} node(s), {name(pinned)}: "
                    f"{row['ops_per_s']:,.0f} ops/s, "
                    f"server {row['server_cpu_s'] / row['operations'] * 1e6:.1f} µs/op, "
                    f"{row['batched_operations'] / max(row['batches'], 1):.1f} ops/batch",
                    flush=True,
                )
    logs = [line for cluster in running.values() for node in cluster.nodes.values() for line in node.log]
    rows = []
    for (size, pinned), runs in measured.items():
        operations = sum(run["operations"] for run in runs)
        rows.append(
            {
                "nodes": size,
                "client": name(pinned),
                "client_processes": size,
                "ops_per_s": max(run["ops_per_s"] for run in runs),
                "ops_per_s_rounds": [run["ops_per_s"] for run in runs],
                "operations": operations,
                "server_cpu_us_per_op": sum(run["server_cpu_s"] for run in runs) / operations * 1e6,
                "client_cpu_us_per_op": sum(run["client_cpu_s"] for run in runs) / operations * 1e6,
                "ops_per_batch": sum(run["batched_operations"] for run in runs)
                / max(sum(run["batches"] for run in runs), 1),
                "forwarded_share": sum(run["forwarded"] for run in runs) / operations,
            }
        )
    return rows, [line for line in logs if " WARNING " in line or " ERROR " in line or "Traceback" in line]


def with_ratios(rows: list[Row]) -> None:
    """Each topology-aware row against the 1-node row; the pinned row against topology-aware on its size."""
    aware = {row["nodes"]: row for row in rows if row["client"] == TOPOLOGY_AWARE}
    first = aware[min(aware)]
    for row in rows:
        base = first if row["client"] == TOPOLOGY_AWARE else aware[row["nodes"]]
        row["baseline"] = f"{base['nodes']} node(s), {TOPOLOGY_AWARE}"
        row["ops_per_s_vs_baseline"] = row["ops_per_s"] / base["ops_per_s"]
        row["server_cpu_per_op_vs_baseline"] = row["server_cpu_us_per_op"] / base["server_cpu_us_per_op"]


# --- restart ----------------------------------------------------------------------------------------


async def started(node: ServerProcess) -> float:
    """Seconds from spawning the node's process to its ready line."""
    began = time.perf_counter()
    await asyncio.to_thread(node.start, 600)
    return time.perf_counter() - began


async def restart(keys: int) -> Row:
    with tempfile.TemporaryDirectory() as directory:
        cluster = ClusterProcesses(Path(directory), 1)
        node = cluster.nodes["node-0"] = cluster.node("node-0")
        try:
            empty_start_s = await started(node)
            began = time.perf_counter()
            async with GrpcStore.with_client(node.target, timeout=120) as root:
                await load_nestkv(root.with_namespace(NAMESPACE), keys, None)
            load_s = time.perf_counter() - began
            began = time.perf_counter()
            stop_code = await asyncio.to_thread(node.stop, timeout=600)
            stop_s = time.perf_counter() - began
            node = cluster.nodes["node-0"] = cluster.node("node-0")
            start_s = await started(node)
            async with GrpcStore.with_client(node.target, timeout=60) as root:
                last = nestkv_keys(keys)[-1]
                if await root.with_namespace(NAMESPACE).get(last) != VALUE:
                    raise RuntimeError(f"the restarted node lost {last!r}")
        finally:
            cluster.stop()
    recovered = next((line for line in node.log if RECOVERED.search(line)), "")
    found = RECOVERED.search(recovered)
    return {
        "keys": keys,
        "load_s": load_s,
        "stop_s": stop_s,
        "stop_exit_code": stop_code,
        "empty_start_s": empty_start_s,
        "start_s": start_s,
        "start_vs_empty": start_s / empty_start_s,
        "recovered_entries": int(found[1]) if found else None,
        "recovered_log_records": int(found[2]) if found else None,
        "recovered_line": recovered,
    }


# --- report -----------------------------------------------------------------------------------------


def report(results: Row) -> str:
    settings = results["settings"]
    lines = [
        f"nestkv cluster benchmark, {results['machine']}, commit {results['commit']}: "
        f"{settings['tasks']} tasks per client process, {GET_FRACTION:.0%} get / {1 - GET_FRACTION:.0%} set "
        f"on {settings['keys']:,} keys, {settings['seconds']:g} s per round, best of {results['rounds']}",
        "",
        "| nodes | client | client processes | ops/s | ops/s vs baseline | server CPU µs/op | vs baseline "
        "| client CPU µs/op | ops per batch | forwarded |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["throughput"]:
        lines.append(
            f"| {row['nodes']} | {row['client']} | {row['client_processes']} | {row['ops_per_s']:,.0f} "
            f"| {row['ops_per_s_vs_baseline']:.2f}x | {row['server_cpu_us_per_op']:.1f} "
            f"| {row['server_cpu_per_op_vs_baseline']:.2f}x | {row['client_cpu_us_per_op']:.1f} "
            f"| {row['ops_per_batch']:.1f} | {row['forwarded_share']:.0%} |"
        )
    restarted = results["restart"]
    lines += [
        "",
        "Baselines: the 1-node cluster for the topology-aware rows; topology-aware on the same cluster "
        "for the pinned row.",
        "",
        "| restart of a node with --data-dir | seconds | vs the empty node's start |",
        "|---|---:|---:|",
        f"| start of the empty node, spawn to ready line | {restarted['empty_start_s']:.2f} | 1.00x |",
        f"| load of {restarted['keys']:,} keys (set_many) | {restarted['load_s']:.2f} | - |",
        f"| SIGTERM to exit (final snapshot) | {restarted['stop_s']:.2f} | - |",
        f"| start with {restarted['keys']:,} keys, spawn to ready line | {restarted['start_s']:.2f} "
        f"| {restarted['start_vs_empty']:.2f}x |",
        "",
        f"recovered: {restarted['recovered_line'] or 'no recovered line in the log'}",
    ]
    problems = results["server_log_problems"]
    lines += ["", f"server log warnings and errors during the throughput runs: {len(problems)}"]
    lines += [f"  {line}" for line in problems[:20]]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> Row:
    began = time.perf_counter()
    settings = {"tasks": args.tasks, "seconds": args.seconds, "keys": args.keys}
    rows, problems = await throughput(args.nodes, settings, args.rounds)
    with_ratios(rows)
    print(f"  restart with {args.restart_keys:,} keys ...", flush=True)
    restarted = await restart(args.restart_keys)
    return {
        "machine": machine(),
        "commit": commit(),
        "settings": settings,
        "get_fraction": GET_FRACTION,
        "rounds": args.rounds,
        "throughput": rows,
        "restart": restarted,
        "server_log_problems": problems,
        "wall_s": time.perf_counter() - began,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodes",
        type=lambda text: sorted({int(n) for n in text.split(",")}),
        default=[1, 2, 3],
        help="comma-separated cluster sizes; the pinned clients run on the largest (default: 1,2,3)",
    )
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks per client process")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; ops/s is the best")
    parser.add_argument("--keys", type=int, default=10_000, help="preloaded key space of the workload")
    parser.add_argument("--restart-keys", type=int, default=1_000_000, help="keys of the restarted node")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    # One event loop for the whole run: after a second asyncio.run, grpc.aio's poller still calls
    # into the first, closed loop ("Event loop is closed" tracebacks).
    results = asyncio.run(run(args))
    publish(results, report(results), args.json)


if __name__ == "__main__":
    main()
