"""`python -m bench` (`make bench`): GrpcStore against Litestar's RedisStore and the in-process LocalStore.

Every figure of a run is measured in that run, on the same machine, and
reported as a ratio against RedisStore: these machines are shared and noisy,
so absolute figures from different runs do not compare. Workloads:

* mixed: 50/50 get/set of 100-byte values (sets with a TTL) on 10,000 keys,
  at 1, 16, 64 and 256 concurrent tasks in one client process: ops/s, p50, p99.
* delete_all: one namespace of 100,000 keys emptied while 1,000,000 keys live
  in another.
* memory: server memory per key with 1,000,000 keys (21-byte keys, 100-byte
  values, TTL): nestkv's RSS growth against redis-server's `used_memory`.
* overheads: mixed at 64 tasks (GrpcStore, Pipeline batches) and unary
  `Exists` calls at 16 tasks (what a polyglot caller sends), against servers
  run plain, with `--metrics-port`, with TLS, and with TLS and a token rooted
  at a namespace (`--auth-file`), interleaved, best of 3 each: what counting,
  TLS and token checks cost, as ratios to the plain server. The token goes
  as call credentials, and for unary calls also as plain metadata (a Python
  client's call credentials run a plugin per call; the server's check is the
  same either way).
* gather: `asyncio.gather` of n single `exists` calls from one GrpcStore, for
  n of 5,000, 20,000 and 100,000 (100,000 operations each: 20 gathers of
  5,000, ...): ops/s against n, as a ratio to the first n (callers beyond
  the batches in flight wait for room in line).

Prints one table, writes it as JSON (`--json`) and draws throughput against
concurrency (`--chart`, needs matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.servers import RedisServer, nestkv_server, redis_server, rss_bytes
from nestkv.client import GrpcStore, LocalStore
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.pki import AuthFile, make_pki

VALUE = b"v" * 100
TTL = 3600
MIXED_KEYS = 10_000
Row = dict[str, Any]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def mixed(store: Any, tasks: int, operations: int, keys: int) -> Row:
    """`operations` 50/50 gets and sets spread over `tasks` tasks: ops/s and latency percentiles."""
    latencies: list[float] = []
    per_task = max(1, operations // tasks)

    async def worker(seed: int) -> None:
        pick = random.Random(seed).randrange
        clock = time.perf_counter
        for i in range(per_task):
            key = f"key{pick(keys)}"
            started = clock()
            if i % 2:
                await store.set(key, VALUE, expires_in=TTL)
            else:
                await store.get(key)
            latencies.append(clock() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(seed) for seed in range(tasks)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "ops_per_s": len(latencies) / elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
    }


async def prepare_mixed(store: Any) -> None:
    """The keys the mixed workload reads, and a warm-up of connections and code paths."""
    await asyncio.gather(*(store.set(f"key{i}", VALUE, expires_in=TTL) for i in range(MIXED_KEYS)))
    await mixed(store, 16, 2_000, MIXED_KEYS)


async def run_mixed(stores: dict[str, Any], concurrency: Sequence[int], operations: int) -> list[Row]:
    rows = []
    for name, store in stores.items():
        await prepare_mixed(store)
        for tasks in concurrency:
            count = operations // 8 if tasks == 1 else operations
            rows.append({"store": name, "tasks": tasks, **await mixed(store, tasks, count, MIXED_KEYS)})
            print(f"  mixed {name:9} {tasks:4} tasks: {rows[-1]['ops_per_s']:10,.0f} ops/s", flush=True)
    return rows


class Variant:
    """A server run with some flags, and how a client reaches it."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        *,
        unary_metadata: bool = False,
    ) -> None:
        self.target = target
        self.credentials = credentials
        self.token = token
        self.unary_metadata = unary_metadata
        """Unary calls carry the token as metadata of their own, not as call credentials."""

    def store(self) -> GrpcStore:
        return GrpcStore.with_client(self.target, credentials=self.credentials, token=self.token)

    def channel(self) -> grpc.aio.Channel:
        """A plain grpc.aio channel, as a polyglot caller would open (the token as call credentials)."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target)
        credentials = self.credentials
        if self.token is not None and not self.unary_metadata:
            call = grpc.access_token_call_credentials(self.token)
            credentials = grpc.composite_channel_credentials(credentials, call)
        return grpc.aio.secure_channel(self.target, credentials)


async def unary_exists(variant: Variant, stub: Any, tasks: int, operations: int) -> float:
    """ops/s of one-operation Exists calls from `tasks` tasks."""
    per_task = max(1, operations // tasks)
    metadata = (("authorization", f"Bearer {variant.token}"),) if variant.unary_metadata else None

    async def worker() -> None:
        for i in range(per_task):
            await stub.Exists(pb.ExistsRequest(path=["unary"], key=f"key{i}"), timeout=10, metadata=metadata)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return per_task * tasks / (time.perf_counter() - started)


async def overheads(variants: dict[str, Variant], operations: int, rounds: int = 3) -> list[Row]:
    """mixed at 64 tasks and unary Exists at 16 tasks on each variant, interleaved, best of `rounds`."""
    best: dict[str, Row] = {
        name: {"variant": name, "mixed_ops_per_s": 0.0, "unary_ops_per_s": 0.0} for name in variants
    }
    stores = {name: variant.store() for name, variant in variants.items()}
    channels = {name: variant.channel() for name, variant in variants.items()}
    stubs = {name: store_pb2_grpc.StoreServiceStub(channel) for name, channel in channels.items()}
    try:
        for name, store in stores.items():
            await prepare_mixed(store.with_namespace("mixed"))
            await unary_exists(variants[name], stubs[name], 16, 1_000)
        for _ in range(rounds):  # the best of each: noise only ever slows a round down
            for name, store in stores.items():
                row = await mixed(store.with_namespace("mixed"), 64, operations, MIXED_KEYS)
                unary = await unary_exists(variants[name], stubs[name], 16, operations // 4)
                best[name]["mixed_ops_per_s"] = max(best[name]["mixed_ops_per_s"], row["ops_per_s"])
                best[name]["unary_ops_per_s"] = max(best[name]["unary_ops_per_s"], unary)
    finally:
        for store in stores.values():
            await store.close()
        for channel in channels.values():
            await channel.close()
    print(f"  overheads: {list(best.values())}", flush=True)
    return list(best.values())


@contextlib.contextmanager
def variant_servers(plain: str) -> Iterator[dict[str, Variant]]:
    """The plain server given, and servers with metrics, with TLS, and with TLS and a scoped token."""
    with tempfile.TemporaryDirectory() as directory:
        pki = make_pki(Path(directory))
        auth_file = AuthFile(Path(directory) / "tokens.toml")
        token = auth_file.mint("bench", ["bench"], "readwrite")
        tls = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
        with (
            nestkv_server("--metrics-port", "0") as metrics,
            nestkv_server(*tls) as secure,
            nestkv_server(*tls, "--auth-file", str(auth_file.path)) as scoped,
        ):
            yield {
                "plaintext": Variant(plain),
                "--metrics-port": Variant(metrics.target),
                "TLS": Variant(secure.target, pki.credentials()),
                "TLS + token": Variant(scoped.target, pki.credentials(), token),
                "TLS + token as metadata": Variant(
                    scoped.target, pki.credentials(), token, unary_metadata=True
                ),
            }


async def run_gather(target: str, sizes: Sequence[int]) -> list[Row]:
    """ops/s of asyncio.gather of n single operations, for each n, over as many operations for each.

    A smaller n runs as many gathers in a row as make up the largest one, so that every row
    does the same work (a lone gather of 5,000 lasts ~0.1 s: too short to time alone).
    """
    rows = []
    total = max(sizes)
    async with GrpcStore.with_client(target, timeout=10) as root:
        store = root.with_namespace("gather")
        await asyncio.gather(*(store.exists(f"key{i}") for i in range(1_000)))  # warm up
        for size in sizes:
            rounds = max(1, total // size)
            started = time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(*(store.exists(f"key{i}") for i in range(size)))
            ops_per_s = rounds * size / (time.perf_counter() - started)
            rows.append({"operations": size, "rounds": rounds, "ops_per_s": ops_per_s})
            print(f"  gather of {size:7,} ops x {rounds:3}: {ops_per_s:10,.0f} ops/s", flush=True)
    return rows


def nestkv_keys(count: int) -> list[str]:
    return [f"session:{i:013d}" for i in range(count)]  # 21 bytes each


async def load_nestkv(store: GrpcStore, count: int, ttl: int | None) -> None:
    keys = nestkv_keys(count)
    for start in range(0, count, 20_000):
        await store.set_many([(key, VALUE) for key in keys[start : start + 20_000]], expires_in=ttl)


async def load_redis(redis: Any, prefix: str, count: int, ttl: int | None) -> None:
    keys = nestkv_keys(count)
    for start in range(0, count, 10_000):
        pipe = redis.pipeline(transaction=False)
        for key in keys[start : start + 10_000]:
            pipe.set(prefix + key, VALUE, ex=ttl)
        await pipe.execute()


async def timed(action: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def nestkv_memory_and_delete_all(target: str, pid: int, keys: int, namespace_keys: int) -> Row:
    async with GrpcStore.with_client(target, timeout=120) as root:
        await root.with_namespace("warm").set("key", VALUE)
        before = rss_bytes(pid)
        await load_nestkv(root.with_namespace("elsewhere"), keys, TTL)
        await asyncio.sleep(0.5)
        per_key = (rss_bytes(pid) - before) / keys
        doomed = root.with_namespace("doomed")
        await load_nestkv(doomed, namespace_keys, None)
        seconds = await timed(doomed.delete_all)
        assert await doomed.get(nestkv_keys(1)[0]) is None
        assert await root.with_namespace("elsewhere").get(nestkv_keys(1)[0]) == VALUE
        await root.with_namespace("elsewhere").delete_all()
    return {"memory_per_key": per_key, "delete_all_s": seconds}


async def redis_memory_and_delete_all(redis_server: RedisServer, keys: int, namespace_keys: int) -> Row:
    from litestar.stores.redis import RedisStore

    redis = redis_server.client()
    try:
        await redis.flushall()
        before = (await redis.info("memory"))["used_memory"]
        await load_redis(redis, "", keys, TTL)  # 21-byte keys, no prefix: the same keys as nestkv's
        per_key = ((await redis.info("memory"))["used_memory"] - before) / keys
        doomed = RedisStore(redis).with_namespace("doomed")
        await load_redis(redis, doomed._make_key(""), namespace_keys, None)
        seconds = await timed(doomed.delete_all)
        assert await doomed.get(nestkv_keys(1)[0]) is None
        assert await redis.get(nestkv_keys(1)[0]) == VALUE
        await redis.flushall()
    finally:
        await redis.aclose()
    return {"memory_per_key": per_key, "delete_all_s": seconds}


def ratio(value: float, baseline: float | None) -> str:
    return f"{value / baseline:.2f}x" if baseline else "-"


def report(results: dict[str, Any]) -> str:
    lines = [
        f"nestkv benchmark, {results['machine']}, commit {results['commit']}, "
        f"clients on {results['client_loop']}, server on its default loop",
        "",
        "| workload | store | ops/s | p50 µs | p99 µs | ops/s vs Redis | p50 vs Redis |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    redis_rows = {row["tasks"]: row for row in results["mixed"] if row["store"] == "RedisStore"}
    for row in results["mixed"]:
        base = redis_rows.get(row["tasks"])
        lines.append(
            f"| mixed, {row['tasks']} tasks | {row['store']} | {row['ops_per_s']:,.0f} | "
            f"{row['p50_us']:,.0f} | {row['p99_us']:,.0f} | "
            f"{ratio(row['ops_per_s'], base and base['ops_per_s'])} | "
            f"{ratio(row['p50_us'], base and base['p50_us'])} |"
        )
    lines += ["", "| workload | GrpcStore | RedisStore | GrpcStore vs Redis |", "|---|---:|---:|---:|"]
    ours, theirs = results["nestkv"], results.get("redis") or {}
    seconds, redis_seconds = ours["delete_all_s"], theirs.get("delete_all_s", 0.0)
    total = results["namespace_keys"] + results["keys"]
    lines.append(
        f"| delete_all, {results['namespace_keys']:,} keys of {total:,} "
        f"| {seconds * 1e3:,.2f} ms | "
        + (
            f"{redis_seconds * 1e3:,.1f} ms | {redis_seconds / seconds:,.0f}x faster |"
            if theirs
            else "- | - |"
        )
    )
    memory, redis_memory = ours["memory_per_key"], theirs.get("memory_per_key", 0.0)
    lines.append(
        f"| memory per key, {results['keys']:,} keys (nestkv RSS, Redis used_memory) | {memory:,.0f} B | "
        + (f"{redis_memory:,.0f} B | {memory / redis_memory:.2f}x |" if theirs else "- | - |")
    )
    lines += ["", "| workload | GrpcStore ops/s | vs the smallest gather |", "|---|---:|---:|"]
    first = results["gather"][0]["ops_per_s"]
    for row in results["gather"]:
        lines.append(
            f"| gather of {row['operations']:,} single ops | {row['ops_per_s']:,.0f} | "
            f"{ratio(row['ops_per_s'], first)} |"
        )
    lines += [
        "",
        "| server (best of 3) | mixed, 64 tasks, ops/s | vs plaintext | unary Exists, 16 tasks, ops/s "
        "| vs plaintext |",
        "|---|---:|---:|---:|---:|",
    ]
    plain = results["overheads"][0]
    for row in results["overheads"]:
        lines.append(
            f"| {row['variant']} | {row['mixed_ops_per_s']:,.0f} | "
            f"{ratio(row['mixed_ops_per_s'], plain['mixed_ops_per_s'])} | {row['unary_ops_per_s']:,.0f} | "
            f"{ratio(row['unary_ops_per_s'], plain['unary_ops_per_s'])} |"
        )
    if results.get("redis_skipped"):
        lines += ["", f"Redis rows skipped: {results['redis_skipped']}"]
    return "\n".join(lines)


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for store in dict.fromkeys(row["store"] for row in results["mixed"]):
        rows = [row for row in results["mixed"] if row["store"] == store]
        axes.plot([r["tasks"] for r in rows], [r["ops_per_s"] for r in rows], marker="o", label=store)
    axes.set(xscale="log", yscale="log", xlabel="concurrent tasks", ylabel="ops/s (50/50 get/set, 100 B)")
    axes.set_xticks(results["concurrency"], [str(t) for t in results["concurrency"]])
    axes.set_title(f"Throughput against concurrency ({results['machine']})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    concurrency = [1, 16, 64, 256]
    results: dict[str, Any] = {
        "machine": machine(),
        "commit": commit(),
        "concurrency": concurrency,
        "keys": args.keys,
        "namespace_keys": args.namespace_keys,
        "client_loop": args.client_loop,
    }
    with nestkv_server() as nestkv, redis_server() as redis:
        print(
            f"nestkv on {nestkv.target}; redis: {redis if isinstance(redis, str) else redis.port}", flush=True
        )
        results["nestkv"] = await nestkv_memory_and_delete_all(
            nestkv.target, nestkv.process.pid, args.keys, args.namespace_keys
        )
        print(f"  nestkv memory and delete_all: {results['nestkv']}", flush=True)
        stores: dict[str, Any] = {
            "LocalStore": LocalStore(),
            "GrpcStore": GrpcStore.with_client(nestkv.target),
        }
        if isinstance(redis, str):
            results["redis_skipped"] = redis
            print(f"  Redis rows skipped: {redis}", flush=True)
        else:
            from litestar.stores.redis import RedisStore
            from redis.asyncio import BlockingConnectionPool

            results["redis"] = await redis_memory_and_delete_all(redis, args.keys, args.namespace_keys)
            print(f"  redis memory and delete_all: {results['redis']}", flush=True)
            pool = BlockingConnectionPool(host="127.0.0.1", port=redis.port, max_connections=max(concurrency))
            stores["RedisStore"] = RedisStore(redis.client(connection_pool=pool))
        results["mixed"] = await run_mixed(
            {name: store.with_namespace("mixed") for name, store in stores.items()},
            concurrency,
            args.operations,
        )
        results["gather"] = await run_gather(nestkv.target, args.gather_sizes)
        with variant_servers(nestkv.target) as variants:
            results["overheads"] = await overheads(variants, args.operations)
        await stores["GrpcStore"].close()
        if "RedisStore" in stores:
            await stores["RedisStore"]._redis.aclose()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=40_000, help="operations per mixed row")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys for the memory test")
    parser.add_argument("--namespace-keys", type=int, default=100_000, help="keys of the deleted namespace")
    parser.add_argument(
        "--gather-sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[5_000, 20_000, 100_000],
        help="comma-separated n of the gather rows (default: 5000,20000,100000)",
    )
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--chart", type=Path, help="draw throughput against concurrency to this PNG")
    parser.add_argument(
        "--client-loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop of the clients"
    )
    args = parser.parse_args(argv)
    if args.client_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run(args))
    else:
        results = asyncio.run(run(args))
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.chart:
        draw(results, args.chart)
        print(f"drew {args.chart}")


if __name__ == "__main__":
    main()
