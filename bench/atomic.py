"""`python -m bench.atomic`: increments per second, nestkv's `GrpcStore.increment` against Redis's INCR.

One nestkv server and one redis-server (no persistence) on this machine, driven
from this one client process in the same run:

* nestkv: `--tasks` tasks sharing one `GrpcStore.with_client(target)` (its
  Pipeline stream batches what the tasks issue together), each calling
  `increment(key)` on a random key of `--keys` keys in the namespace "bench",
  one call after another;
* Redis: the same tasks and keys ("bench:counterN", as Litestar's RedisStore
  names a namespace's keys) through redis-py's asyncio client, `INCR` on a
  `BlockingConnectionPool` of as many connections as tasks (one command per
  connection at a time, as an app's handlers would).

Rounds of `--seconds` each alternate nestkv and Redis, so that a slow spell of
the machine hits both alike; the figures are medians over the rounds: ops/s,
per-call latency p50 and p99 (over the round's calls), and CPU per increment of
the server (utime + stime from /proc) and of this client process. The ratio
nestkv / Redis is of the median ops/s (the goal: 3x or more). At the end, the
counters of each store must sum to the increments made (none lost, none twice).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.__main__ import commit, machine, percentile
from bench.cluster import cpu_seconds
from bench.output import publish
from bench.servers import RedisServer, nestkv_server, redis_server
from nestkv.client import GrpcStore

NAMESPACE = "bench"
WARM_UP_S = 0.5
GOAL = 3.0
Row = dict[str, Any]
Increment = Callable[[str], Awaitable[Any]]


async def workload(increment: Increment, keys: list[str], tasks: int, seconds: float) -> Row:
    """`tasks` tasks calling `increment` on random keys, one call after another, until `seconds` pass."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker(rng: random.Random) -> None:
        clock = time.perf_counter
        pick = rng.choice
        while time.monotonic() < deadline:
            started = clock()
            await increment(pick(keys))
            latencies.append(clock() - started)

    started = time.monotonic()
    await asyncio.gather(*(worker(random.Random(n)) for n in range(tasks)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "operations": len(latencies),
        "ops_per_s": len(latencies) / elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
    }


class Contender:
    """One store under test: how to increment a key, how to read every counter, its server's pid."""

    def __init__(self, name: str, increment: Increment, total: Callable[[], Awaitable[int]], pid: int):
        self.name = name
        self.increment = increment
        self.total = total
        self.pid = pid
        self.made = 0  # increments made so far, warm-up included: what `total` must come to
        self.rounds: list[Row] = []

    async def run(self, keys: list[str], tasks: int, seconds: float) -> Row:
        cpu, server_cpu = time.process_time(), cpu_seconds(self.pid)
        row = await workload(self.increment, keys, tasks, seconds)
        row["client_cpu_us_per_op"] = (time.process_time() - cpu) / row["operations"] * 1e6
        row["server_cpu_us_per_op"] = (cpu_seconds(self.pid) - server_cpu) / row["operations"] * 1e6
        self.made += row["operations"]
        return row

    async def summary(self) -> Row:
        total = await self.total()
        figures = ["ops_per_s", "p50_us", "p99_us", "server_cpu_us_per_op", "client_cpu_us_per_op"]
        return {
            **{name: statistics.median(row[name] for row in self.rounds) for name in figures},
            "ops_per_s_rounds": [row["ops_per_s"] for row in self.rounds],
            "operations": sum(row["operations"] for row in self.rounds),
            "counters_sum": total,
            "increments_made": self.made,
            "counts_exact": total == self.made,
        }


def nestkv_contender(store: GrpcStore, keys: list[str], pid: int) -> Contender:
    async def total() -> int:
        values = await store.get_many(keys)
        return sum(int(value) for value in values if value is not None)

    return Contender("nestkv", store.increment, total, pid)


def redis_contender(client: Any, keys: list[str], pid: int) -> Contender:
    names = [f"{NAMESPACE}:{key}" for key in keys]

    async def increment(key: str) -> Any:
        return await client.incr(f"{NAMESPACE}:{key}")

    async def total() -> int:
        return sum(int(value) for value in await client.mget(names) if value is not None)

    return Contender("redis", increment, total, pid)


async def run(args: argparse.Namespace) -> Row:
    began = time.perf_counter()
    keys = [f"counter{n}" for n in range(args.keys)]
    results: Row = {
        "machine": machine(),
        "commit": commit(),
        "settings": {"tasks": args.tasks, "seconds": args.seconds, "rounds": args.rounds, "keys": args.keys},
    }
    with nestkv_server() as nestkv, redis_server() as redis:
        root = GrpcStore.with_client(nestkv.target)
        contenders = [nestkv_contender(root.with_namespace(NAMESPACE), keys, nestkv.process.pid)]
        client = None
        if isinstance(redis, RedisServer):
            from redis.asyncio import BlockingConnectionPool

            pool = BlockingConnectionPool(host="127.0.0.1", port=redis.port, max_connections=args.tasks)
            client = redis.client(connection_pool=pool)
            contenders.append(redis_contender(client, keys, redis.process.pid))
        else:
            results["redis_skipped"] = redis
            print(f"  Redis skipped: {redis}", flush=True)
        try:
            for contender in contenders:  # channels and connections open, code paths warm, keys made
                contender.made += (await workload(contender.increment, keys, args.tasks, WARM_UP_S))[
                    "operations"
                ]
            for number in range(args.rounds):
                for contender in contenders:
                    row = await contender.run(keys, args.tasks, args.seconds)
                    contender.rounds.append(row)
                    print(
                        f"  round {number + 1}: {contender.name:6} {row['ops_per_s']:10,.0f} increments/s, "
                        f"p50 {row['p50_us']:,.0f} µs, server {row['server_cpu_us_per_op']:.1f} µs/op, "
                        f"client {row['client_cpu_us_per_op']:.1f} µs/op",
                        flush=True,
                    )
            for contender in contenders:
                results[contender.name] = await contender.summary()
        finally:
            await root.close()
            if client is not None:
                await client.aclose()
    if "redis" in results:
        ours, theirs = results["nestkv"], results["redis"]
        results["ratio_nestkv_to_redis"] = {
            "ops_per_s": ours["ops_per_s"] / theirs["ops_per_s"],
            "p50_us": ours["p50_us"] / theirs["p50_us"],
            "server_cpu_us_per_op": ours["server_cpu_us_per_op"] / theirs["server_cpu_us_per_op"],
            "client_cpu_us_per_op": ours["client_cpu_us_per_op"] / theirs["client_cpu_us_per_op"],
        }
        results["goal_ops_per_s_ratio"] = GOAL
        results["goal_met"] = results["ratio_nestkv_to_redis"]["ops_per_s"] >= GOAL
    results["wall_s"] = time.perf_counter() - began
    return results


def report(results: Row) -> str:
    settings = results["settings"]
    lines = [
        f"increments, {results['machine']}, commit {results['commit']}: {settings['tasks']} tasks, "
        f"{settings['keys']:,} keys, {settings['rounds']} rounds of {settings['seconds']:g} s, medians",
        "",
        "| store | increments/s | p50 | p99 | server CPU/op | client CPU/op | counts exact |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    names = {"nestkv": "nestkv GrpcStore.increment", "redis": "Redis INCR (redis.asyncio, pool)"}
    for name, label in names.items():
        if name in results:
            row = results[name]
            lines.append(
                f"| {label} | {row['ops_per_s']:,.0f} | {row['p50_us']:,.0f} µs | {row['p99_us']:,.0f} µs "
                f"| {row['server_cpu_us_per_op']:.1f} µs | {row['client_cpu_us_per_op']:.1f} µs "
                f"| {'yes' if row['counts_exact'] else 'NO'} |"
            )
    ratio = results.get("ratio_nestkv_to_redis")
    if ratio:
        lines += [
            "",
            f"nestkv / Redis: {ratio['ops_per_s']:.2f}x the increments/s "
            f"(goal {results['goal_ops_per_s_ratio']:g}x: {'met' if results['goal_met'] else 'not met'}), "
            f"{ratio['p50_us']:.2f}x the p50, "
            f"{ratio['server_cpu_us_per_op']:.2f}x the server CPU, "
            f"{ratio['client_cpu_us_per_op']:.2f}x the client CPU per increment",
        ]
    else:
        lines += ["", f"Redis skipped: {results.get('redis_skipped')}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.atomic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks of the client")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (nestkv, Redis, ...)")
    parser.add_argument("--keys", type=int, default=1_000, help="counters the tasks pick from at random")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    publish(results, report(results), args.json)


if __name__ == "__main__":
    main()
