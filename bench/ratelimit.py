"""`python -m bench.ratelimit` (`make bench`): requests/s of a rate-limited Litestar app, nestkv vs Redis.

tests/ratelimit_app.py served by `--workers` uvicorn worker processes (4), three times over, all
started before the first round:

* nestkv: nestkv.client.ratelimit.CountingRateLimitMiddleware over a GrpcStore to a nestkv
  server: one atomic `increment` on the server per request, no lock in the app;
* redis: Litestar's stock RateLimitMiddleware over its RedisStore on a redis-server (no
  persistence): per request, under a lock of the worker process, a GET of the identifier's
  history, a JSON decode, a JSON encode with the request's timestamp added, and a SET;
* none: the same app without rate limiting: the ceiling (`--no-ceiling` leaves it out).

The limit is 10^9 requests a minute, so no request is refused: what is measured is what
counting costs, not refusals. The load comes from this process: `--connections` keep-alive
HTTP/1.1 connections (asyncio streams), each sending GET /limited one request after another,
for `--seconds`, in rounds alternating nestkv, redis, none (`--rounds` each), so that a slow
spell of the machine hits all alike. Figures are medians over the rounds: requests/s (also over
a round's first and last second), latency p50 and p99 (over the round's requests, as the client
sees them), CPU per request (utime + stime from /proc) of the app's worker processes, of the
store's server and of this client process, and the share of a round's requests the busiest
worker answered. Ratios: nestkv / redis, and each against none.

`--client httpx` sends the requests through one httpx.AsyncClient with a pool of
`--connections` instead. That measures httpx more than the app: its pool looks over every
connection for each request, and with 64 connections on a 2-core machine it took about 10 ms of
CPU per request (the streams: about 0.15 ms; the app's workers without rate limiting: about
0.3 ms), which held all three setups alike at about 100 requests/s.

One identifier: both middlewares limit by the client's address, and every connection of a
round comes from the same one, so every request of a round counts against one counter: the
contended case a rate limiter must handle. With the stock middleware that also means that the
requests of one worker process take its lock in turn: a worker counts one request at a time,
two round trips to Redis each. Each round has an address of its own (127.0.0.2, .3, ...): the
stock middleware keeps one timestamp per request in the window (60 s from the identifier's
first request) and decodes and rewrites them all on every request, so a fresh identifier
starts each round from an empty history, rather than from the histories of the rounds before.

Checked, not timed: every response is a 200; nestkv's counters of a round's identifier sum to
the round's requests (counts exact); for the stock middleware, the timestamps its history holds
after a round against the round's requests (the rest were lost: workers overwrite each other's
get-then-set, litestar#4700).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.__main__ import commit, machine, percentile
from bench.cluster import cpu_seconds
from bench.output import publish
from bench.servers import RedisServer, nestkv_server, redis_server
from nestkv.client import GrpcStore

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.ratelimit_app:create_app"
WORKER_HEADER = "X-Worker-Pid"  # as tests/ratelimit_app.py sets it
LIMIT = 10**9  # requests a minute: none is refused
WINDOW_S = 60
WARM_UP_S = 1.0
START_TIMEOUT_S = 120
IDENTIFIER = "the client's address (get_remote_address): 127.0.0.N, one for every request of a round"
LABELS = {
    "nestkv": "CountingRateLimitMiddleware, nestkv",
    "redis": "stock RateLimitMiddleware, RedisStore",
    "none": "no rate limiting (ceiling)",
}
FIGURES = ["requests_per_s", "p50_ms", "p99_ms", "app_cpu_us", "store_cpu_us", "client_cpu_us"]
FIGURES += ["first_s_requests_per_s", "last_s_requests_per_s", "busiest_worker_share"]
Row = dict[str, Any]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (uvicorn's workers), from /proc (Linux)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


class App:
    """tests/ratelimit_app.py served by `workers` uvicorn worker processes: started on creation
    (in a session of its own), `ready()` once every worker has started and the app answers."""

    def __init__(self, name: str, store_url: str, middleware: str, workers: int, log: Path) -> None:
        self.name = name
        self.workers = workers
        self.log = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.store_pid: int | None = None
        self.worker_pids: list[int] = []
        env = {
            **os.environ,
            "RATELIMIT_STORE": store_url,
            "RATELIMIT_MIDDLEWARE": middleware,
            "RATELIMIT_LIMIT": str(LIMIT),
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-m", "uvicorn", "--factory", APP, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", str(workers), "--no-access-log"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            started = self.log.read_text().count("Application startup complete")
            if started == self.workers and answers(self.base + "/health"):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"uvicorn ({self.name}) did not start {self.workers} workers:\n{self.log.read_text()}"
                )
            time.sleep(0.1)
        self.worker_pids = descendants(self.process.pid)

    def app_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.worker_pids)

    def store_cpu(self) -> float:
        return 0.0 if self.store_pid is None else cpu_seconds(self.store_pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # uvicorn stops its workers, then itself
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the group, if any


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


REQUEST = b"GET /limited HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Tally:
    """What a load's requests came to: latencies, completion times, statuses, workers reached."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.done_at: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.workers: collections.Counter[str] = collections.Counter()

    def add(self, started: float, status: int, worker: str | None) -> None:
        now = time.perf_counter()
        self.latencies.append(now - started)
        self.done_at.append(now)
        self.statuses[status] += 1
        self.workers[worker or "?"] += 1


async def raw_connection(port: int, source: str, deadline: float, tally: Tally) -> None:
    """One keep-alive HTTP/1.1 connection from `source`, a GET /limited after another until `deadline`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        clock = time.perf_counter
        while time.monotonic() < deadline:
            started = clock()
            writer.write(REQUEST)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
            await reader.readexactly(int(headers["content-length"]))
            if headers.get("connection") == "close":
                raise RuntimeError(f"the app closed the connection: {head[0]}")
            tally.add(started, int(head[0].split()[1]), headers.get(WORKER_HEADER.lower()))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def httpx_load(base: str, source: str, connections: int, deadline: float, tally: Tally) -> None:
    """`connections` tasks sharing one httpx.AsyncClient (a pool of `connections`) from `source`."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
    async with httpx.AsyncClient(base_url=base, transport=transport, timeout=60) as client:

        async def connection() -> None:
            clock = time.perf_counter
            while time.monotonic() < deadline:
                started = clock()
                answer = await client.get("/limited")
                tally.add(started, answer.status_code, answer.headers.get(WORKER_HEADER))

        await asyncio.gather(*(connection() for _ in range(connections)))


async def load(app: App, source: str, args: argparse.Namespace, seconds: float) -> Row:
    """GET /limited from `args.connections` connections bound to the address `source`, each one
    request after another, until `seconds` pass: requests/s (over the whole load, and over its
    first and last second), latency percentiles, statuses, workers reached."""
    tally = Tally()
    began = time.perf_counter()
    deadline = time.monotonic() + seconds
    if args.client == "httpx":
        await httpx_load(app.base, source, args.connections, deadline, tally)
    else:
        connections = (raw_connection(app.port, source, deadline, tally) for _ in range(args.connections))
        await asyncio.gather(*connections)
    elapsed = time.perf_counter() - began
    latencies = sorted(tally.latencies)
    edge = min(1.0, seconds / 2)
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "first_s_requests_per_s": sum(at < began + edge for at in tally.done_at) / edge,
        "last_s_requests_per_s": sum(at >= began + elapsed - edge for at in tally.done_at) / edge,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "not_200": sum(count for status, count in tally.statuses.items() if status != 200),
        "statuses": {str(status): count for status, count in sorted(tally.statuses.items())},
        "workers_reached": len(tally.workers),
        "busiest_worker_share": max(tally.workers.values()) / len(latencies),
    }


class Sources:
    """Loopback addresses, a fresh one for each load: a fresh identifier for the rate limiters."""

    def __init__(self) -> None:
        self.next = 2

    def take(self) -> str:
        if self.next > 254:
            raise RuntimeError("out of 127.0.0.N addresses: fewer rounds")
        source = f"127.0.0.{self.next}"
        self.next += 1
        return source


async def nestkv_counted(store: Any, source: str, windows: range) -> int:
    """The sum of CountingRateLimitMiddleware's counters of `source` over `windows`."""
    keys = [f"CountingRateLimitMiddleware::{source}::{WINDOW_S}:{window}" for window in windows]
    return sum(int(value) for value in await store.get_many(keys) if value is not None)


async def redis_recorded(client: Any, source: str) -> int:
    """The timestamps in the stock middleware's history of `source` (RedisStore's key naming)."""
    value = await client.get(f"LITESTAR_rate_limit:RateLimitMiddleware::{source}")
    return 0 if value is None else len(json.loads(value)["history"])


async def measure(app: App, sources: Sources, args: argparse.Namespace, counters: Any, redis: Any) -> Row:
    source = sources.take()
    first_window = int(time.time()) // WINDOW_S
    app_cpu, store_cpu, client_cpu = app.app_cpu(), app.store_cpu(), time.process_time()
    row = await load(app, source, args, args.seconds)
    requests = row["requests"]
    row["app_cpu_us"] = (app.app_cpu() - app_cpu) / requests * 1e6
    row["store_cpu_us"] = (app.store_cpu() - store_cpu) / requests * 1e6
    row["client_cpu_us"] = (time.process_time() - client_cpu) / requests * 1e6
    if app.name == "nestkv":
        windows = range(first_window, int(time.time()) // WINDOW_S + 1)
        row["counted"] = await nestkv_counted(counters, source, windows)
    elif app.name == "redis":
        row["recorded"] = await redis_recorded(redis, source)
    return row


def summary(rounds: list[Row]) -> Row:
    row: Row = {name: statistics.median(r[name] for r in rounds) for name in FIGURES}
    row["requests_per_s_rounds"] = [r["requests_per_s"] for r in rounds]
    row["requests"] = sum(r["requests"] for r in rounds)
    row["not_200"] = sum(r["not_200"] for r in rounds)
    row["workers_reached_min"] = min(r["workers_reached"] for r in rounds)
    row["busiest_worker_share_max"] = max(r["busiest_worker_share"] for r in rounds)
    if "counted" in rounds[0]:
        row["counted"] = sum(r["counted"] for r in rounds)
        row["counts_exact"] = all(r["counted"] == r["requests"] for r in rounds)
    if "recorded" in rounds[0]:
        row["recorded"] = sum(r["recorded"] for r in rounds)
        row["recorded_share"] = row["recorded"] / row["requests"]
    return row


async def rounds(
    apps: list[App], args: argparse.Namespace, counters: Any, redis: Any
) -> dict[str, list[Row]]:
    sources = Sources()
    for app in apps:  # connections, workers and their store clients warm
        await load(app, sources.take(), args, WARM_UP_S)
    done: dict[str, list[Row]] = {app.name: [] for app in apps}
    for number in range(args.rounds):
        for app in apps:
            row = await measure(app, sources, args, counters, redis)
            done[app.name].append(row)
            print(
                f"  round {number + 1}: {app.name:6} {row['requests_per_s']:7,.0f} requests/s, "
                f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, CPU/request: "
                f"app {row['app_cpu_us']:,.0f} µs, store {row['store_cpu_us']:,.0f} µs, "
                f"client {row['client_cpu_us']:,.0f} µs; first/last second "
                f"{row['first_s_requests_per_s']:,.0f}/{row['last_s_requests_per_s']:,.0f} requests/s, "
                f"busiest worker {row['busiest_worker_share']:.0%}",
                flush=True,
            )
    return done


async def measure_all(
    apps: list[App], args: argparse.Namespace, nestkv_target: str, redis: Any
) -> dict[str, list[Row]]:
    async with GrpcStore.with_client(nestkv_target) as root:
        client = redis.client() if isinstance(redis, RedisServer) else None
        try:
            return await rounds(apps, args, root.with_namespace("rate_limit"), client)
        finally:
            if client is not None:
                await client.aclose()


def run(args: argparse.Namespace) -> Row:
    began = time.perf_counter()
    results: Row = {
        "machine": machine(),
        "commit": commit(),
        "settings": {
            "connections": args.connections,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "workers": args.workers,
            "client": args.client,
            "limit_per_minute": LIMIT,
            "identifier": IDENTIFIER,
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as logs,
        nestkv_server() as nestkv,
        redis_server() as redis,
        contextlib.ExitStack() as stack,
    ):
        setups: list[tuple[str, str, str, int | None]] = [
            ("nestkv", f"nestkv://{nestkv.target}", "counting", nestkv.process.pid)
        ]
        if isinstance(redis, RedisServer):
            setups.append(("redis", f"redis://127.0.0.1:{redis.port}", "stock", redis.process.pid))
        else:
            results["redis_skipped"] = redis
            print(f"  Redis skipped: {redis}", flush=True)
        if not args.no_ceiling:
            setups.append(("none", f"nestkv://{nestkv.target}", "none", None))
        apps: list[App] = []
        for name, store_url, middleware, store_pid in setups:
            app = App(name, store_url, middleware, args.workers, Path(logs) / f"{name}.log")
            stack.callback(app.stop)
            app.store_pid = store_pid
            apps.append(app)
        for app in apps:  # started together, waited for in turn
            app.ready()
        results["startup_s"] = time.perf_counter() - began
        done = asyncio.run(measure_all(apps, args, nestkv.target, redis))
    for name, rows in done.items():
        results[name] = summary(rows)
    if "redis" in results:
        ours, theirs = results["nestkv"], results["redis"]
        ratios = ["requests_per_s", "p50_ms", "p99_ms", "app_cpu_us"]
        results["ratio_nestkv_to_redis"] = {name: ours[name] / theirs[name] for name in ratios}
    if "none" in results:
        results["ratio_to_none"] = {
            name: results[name]["requests_per_s"] / results["none"]["requests_per_s"]
            for name in ("nestkv", "redis")
            if name in results
        }
    results["wall_s"] = time.perf_counter() - began
    return results


def report(results: Row) -> str:
    settings = results["settings"]
    lines = [
        f"rate-limited Litestar app, {results['machine']}, commit {results['commit']}: "
        f"{settings['workers']} uvicorn workers, {settings['connections']} connections "
        f"({settings['client']} client), {settings['rounds']} rounds of {settings['seconds']:g} s, medians",
        f"identifier: {settings['identifier']} (the contended case); "
        f"limit {settings['limit_per_minute']:,} a minute: nothing refused",
        "",
        "| setup | requests/s | p50 | p99 | CPU/request: app workers | store server | client | not 200 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in LABELS.items():
        if name in results:
            row = results[name]
            lines.append(
                f"| {label} | {row['requests_per_s']:,.0f} | {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms "
                f"| {row['app_cpu_us']:,.0f} µs | {row['store_cpu_us']:,.0f} µs "
                f"| {row['client_cpu_us']:,.0f} µs | {row['not_200']} |"
            )
    lines.append("")
    ratio = results.get("ratio_nestkv_to_redis")
    if ratio:
        lines.append(
            f"nestkv / Redis: {ratio['requests_per_s']:.2f}x the requests/s, "
            f"{ratio['p50_ms']:.2f}x the p50, {ratio['p99_ms']:.2f}x the p99, "
            f"{ratio['app_cpu_us']:.2f}x the app workers' CPU per request"
        )
    else:
        lines.append(f"Redis skipped: {results.get('redis_skipped')}")
    for name, value in results.get("ratio_to_none", {}).items():
        lines.append(f"{name} / no rate limiting: {value:.2f}x the requests/s")
    nestkv = results["nestkv"]
    lines.append(
        f"nestkv counted {nestkv['counted']:,} of {nestkv['requests']:,} requests "
        f"({'exact' if nestkv['counts_exact'] else 'NOT EXACT'})"
    )
    if "redis" in results:
        redis = results["redis"]
        lines.append(
            f"the stock middleware's histories hold {redis['recorded']:,} of {redis['requests']:,} requests "
            f"({redis['recorded_share']:.0%}; the rest lost between workers); each worker takes its lock "
            f"around its get-then-set: one request counted at a time per worker"
        )
    lines.append(f"startup of the apps and servers: {results['startup_s']:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections of the client")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measured round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each setup")
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="raw: asyncio streams, keep-alive connections; httpx: one AsyncClient, a pool of --connections",
    )
    parser.add_argument("--workers", type=int, default=4, help="uvicorn worker processes of each app")
    parser.add_argument("--no-ceiling", action="store_true", help="leave out the app without rate limiting")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = run(args)
    publish(results, report(results), args.json)


if __name__ == "__main__":
    main()
