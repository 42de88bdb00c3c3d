"""--max-memory and --eviction-policy on a real server: floods of twice the bound, checked by RSS."""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from nestkv.client import GrpcStore, StoreFullError
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.serverproc import ServerProcess

BOUND = 16 * 1024 * 1024
VALUE = b"x" * 1024
CHUNK = 1000


def rss(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def flood(store: GrpcStore, total_bytes: int, ttl: int | None, hot: list[str]) -> int:
    """Write `total_bytes` of fresh 1 KiB values, reading the `hot` keys between chunks; count refusals."""
    refused = 0
    for start in range(0, total_bytes // len(VALUE), CHUNK):
        try:
            await store.set_many({f"flood{i}": VALUE for i in range(start, start + CHUNK)}, expires_in=ttl)
        except StoreFullError:
            refused += 1
        if hot:
            await store.get_many(hot)
    return refused


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru", "volatile-lru", "volatile-ttl"])
async def test_a_flood_of_twice_the_bound_keeps_memory_bounded(policy: str) -> None:
    with ServerProcess("--max-memory", "16M", "--eviction-policy", policy) as server:
        async with GrpcStore.with_client(server.target, timeout=30) as root:
            store = root.with_namespace("flood")
            await store.set("warm", b"up")
            baseline = rss(server)
            kept = [f"kept{i}" for i in range(2000)]  # 2 MiB written first, each policy's survivors
            # volatile-ttl: the oldest keys expire last, so that insertion order would evict them.
            kept_ttl = {"volatile-lru": None, "volatile-ttl": 36_000}.get(policy, 3600)
            await store.set_many(dict.fromkeys(kept, VALUE), expires_in=kept_ttl)
            ttl = 3600
            refused = await flood(store, 2 * BOUND, ttl, hot=kept[:200])
            after_one = rss(server)
            # As much again, twice: once the allocator has settled at the bound, more writes take no
            # more memory (the first repeat can still settle arenas by a few MiB).
            refused += await flood(store, 2 * BOUND, ttl, hot=kept[:200])
            settled = rss(server)
            refused += await flood(store, 2 * BOUND, ttl, hot=kept[:200])
            after_three = rss(server)
            survivors = await store.get_many(kept)
    growth = after_one - baseline
    # The bound counts keys and values plus a calibrated overhead; RSS also holds
    # gRPC's message buffers and the allocator's slack, hence the margin.
    assert growth < 1.6 * BOUND, f"RSS grew {growth / 2**20:.1f} MiB for a {BOUND / 2**20:.0f} MiB bound"
    assert after_three - settled < BOUND / 4, "memory kept growing with the writes"
    assert settled - after_one < BOUND / 2
    alive = [key for key, value in zip(kept, survivors, strict=True) if value is not None]
    if policy == "noeviction":
        assert refused > 0  # writes over the bound were refused...
        assert len(alive) == len(kept)  # ...and nothing stored was lost
    elif policy == "allkeys-lru":
        assert refused == 0
        assert set(kept[:200]) <= set(alive)  # read between chunks: recently used, kept
        assert len(alive) < len(kept)  # the cold ones went
    elif policy == "volatile-lru":
        assert refused == 0
        assert len(alive) == len(kept)  # no deadline: never evicted
    else:
        assert refused == 0
        assert len(alive) == len(kept)  # the nearest deadlines went first: the flood's


# Shapes a tenant may give its keys (all with empty values), by the path and key of key i.
FLOOD_SHAPES: dict[str, Callable[[int], tuple[tuple[str, ...], str]]] = {
    "flat": lambda i: (("flat",), f"k{i:08d}"),
    "one-namespace-per-key": lambda i: ((f"n{i:08d}",), "k"),
    "32-deep-chain-per-key": lambda i: ((f"c{i:08d}", *("s",) * 31), "k"),
    "256-byte-names": lambda i: ((f"{i:0256d}",), "k"),
}
SMALL_BOUND = 8 * 1024 * 1024
# gRPC's buffers, the allocator's arenas, the interpreter's caches: RSS beyond what the store holds.
RSS_ALLOWANCE = 6 * 1024 * 1024


def in_path(store: GrpcStore, path: tuple[str, ...]) -> GrpcStore:
    return functools.reduce(GrpcStore.with_namespace, path, store)


@pytest.mark.parametrize("shape", FLOOD_SHAPES)
async def test_a_flood_of_any_shape_stops_at_the_bound_and_so_does_rss(shape: str) -> None:
    # Uncounted namespaces let a 32-deep chain per key grow RSS 800 MB under an 8 MiB bound.
    shape_of = FLOOD_SHAPES[shape]
    with ServerProcess("--max-memory", "8M") as server:
        async with GrpcStore.with_client(server.target, timeout=30) as store:
            await store.set("warm", b"up")
            baseline = rss(server)
            written, full = 0, False
            while not full:
                writes = [shape_of(i) for i in range(written, written + CHUNK)]
                results = await asyncio.gather(
                    *(in_path(store, path).set(key, b"") for path, key in writes), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(result, StoreFullError):
                        raise result
                full = any(isinstance(result, StoreFullError) for result in results)
                written += CHUNK
                assert written < 10_000_000, "the store never filled"
            grown = rss(server) - baseline
            stats = await store.stats()
    assert stats.server.memory_bytes <= SMALL_BOUND
    assert grown < 1.5 * SMALL_BOUND + RSS_ALLOWANCE, (
        f"RSS grew {grown / 2**20:.1f} MiB for {shape} under an {SMALL_BOUND / 2**20:.0f} MiB bound"
    )


async def test_evicted_keys_stay_gone_after_a_restart(tmp_path: Path) -> None:
    args = ("--max-memory", "2M", "--eviction-policy", "allkeys-lru", "--data-dir", str(tmp_path))
    with ServerProcess(*args) as server:
        async with GrpcStore.with_client(server.target) as store:
            await store.set_many({f"k{i}": VALUE for i in range(4000)})  # twice the bound
            before = await store.get_many([f"k{i}" for i in range(4000)])
        # Killed: no snapshot at shutdown stands in for the log's records of the evictions.
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    with ServerProcess(*args) as server:
        async with GrpcStore.with_client(server.target) as store:
            after = await store.get_many([f"k{i}" for i in range(4000)])
    assert 0 < sum(v is not None for v in before) < 4000
    assert after == before


async def test_one_connection_cannot_hold_more_calls_than_the_limit() -> None:
    with ServerProcess("--max-concurrent-streams", "1") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            first = stub.Pipeline()
            await first.write(pb.PipelineRequest(id=1, operations=[pb.Operation(get=pb.GetRequest(key="k"))]))
            await first.read()  # open, idle, holding the connection's one stream
            second = asyncio.ensure_future(stub.Get(pb.GetRequest(key="k")))
            await asyncio.sleep(0.5)
            assert not second.done()  # waits for a stream
            first.cancel()
            async with asyncio.timeout(10):
                response = await second
            assert not response.found
