"""GrpcStore.stats() and the Stats RPC against a real server process."""

from __future__ import annotations

import asyncio

import pytest

from nestkv.client import GrpcStore, InvalidRequestError, Stats
from nestkv.server import VERSION
from nestkv.server.storage.engine import entry_size
from nestkv.server.storage.expiry import LISTING_BYTES, SLOT_OVERHEAD
from nestkv.server.storage.tree import TRAILER_BYTES, namespace_size
from tests.serverproc import ServerProcess


def size(key: str, value: bytes) -> int:
    return entry_size(key, value + bytes(TRAILER_BYTES))


async def test_stats_of_a_subtree_and_of_the_server() -> None:
    with ServerProcess("--max-memory", "4M", "--eviction-policy", "allkeys-lru") as server:
        async with GrpcStore.with_client(server.target) as root:
            a = root.with_namespace("a")
            await a.set("k1", b"x" * 10)
            await a.set("k2", b"x" * 20, expires_in=100)
            await a.with_namespace("b").set("k3", b"x" * 30, expires_in=100)
            await a.with_namespace("c").set("k4", b"x" * 40)
            await root.with_namespace("ab").set("k5", b"x" * 50)  # a look-alike: not in ["a"]
            stats = await a.stats()
            everything = await root.stats()
    assert isinstance(stats, Stats)
    assert stats.path == ("a",)
    assert stats.namespace.keys == 4
    assert stats.namespace.expiring_keys == 2
    assert stats.namespace.child_namespaces == 2
    # The entries, the namespaces a, a/b and a/c, and a list in the expiry wheel for a and for a/b.
    assert stats.namespace.bytes == sum(
        size(key, b"x" * n) for key, n in (("k1", 10), ("k2", 20), ("k3", 30), ("k4", 40))
    ) + sum(namespace_size(name) for name in "abc") + 2 * (SLOT_OVERHEAD + LISTING_BYTES)
    assert everything.namespace.keys == everything.server.keys == 5
    assert everything.namespace.child_namespaces == 2
    assert (
        everything.server.memory_bytes
        == everything.namespace.bytes
        == stats.namespace.bytes + size("k5", b"x" * 50) + namespace_size("ab")
    )
    assert everything.server.max_memory_bytes == 4 * 1024 * 1024
    assert everything.server.evictions == everything.server.expired_keys == 0
    assert everything.server.uptime_seconds > 0
    assert everything.server.version == VERSION


async def test_stats_count_expirations_and_evictions() -> None:
    with ServerProcess("--max-memory", "1M", "--eviction-policy", "allkeys-lru") as server:
        async with GrpcStore.with_client(server.target) as store:
            await store.set_many({f"brief{i}": b"v" for i in range(10)}, expires_in=0.2)  # type: ignore[arg-type]
            await asyncio.sleep(0.6)  # reclaimed by the server's reaper, nobody reading
            await store.set_many({f"big{i}": b"v" * 1000 for i in range(2000)})  # twice the bound
            stats = await store.stats()
    assert stats.server.expired_keys == 10
    assert stats.server.evictions > 0
    assert stats.server.keys == 2000 - stats.server.evictions
    assert stats.server.memory_bytes <= stats.server.max_memory_bytes


async def test_stats_of_a_missing_namespace_are_zero_and_a_bad_path_is_refused(server: ServerProcess) -> None:
    async with GrpcStore.with_client(server.target) as store:
        stats = await store.with_namespace("never-written").stats()
        assert (stats.namespace.keys, stats.namespace.bytes, stats.namespace.child_namespaces) == (0, 0, 0)
        deep = store
        for i in range(33):
            deep = deep.with_namespace(str(i))
        with pytest.raises(InvalidRequestError) as caught:
            await deep.stats()
        assert caught.value.reason == "INVALID_FIELD"
