"""`python -m bench.snapshot`: what a snapshot costs the server that takes it.

* pause: the serving loop's longest stall while a snapshot of `--keys` keys
  (one namespace, 21-byte keys, 100-byte values with a TTL) is taken in
  process, seen by a probe task that asks to wake every millisecond, against
  the same probe's longest stall over the same time with no snapshot.
* recovery: the time to load that snapshot back, and the keys per second.
* under load: a real server with `--snapshot-interval 0.3` under 20 writers
  for `--load-seconds`: snapshots that completed against those that failed,
  read from the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from nestkv.client import GrpcStore, StoreUnavailableError
from nestkv.server.storage import NamespacedStorage
from nestkv.server.storage.persistence import Persistence
from tests.serverproc import ServerProcess

VALUE = b"v" * 100


async def longest_stall(until: asyncio.Future[Any]) -> float:
    """The longest the loop kept a 1 ms sleep waiting beyond its 1 ms, until `until` is done."""
    worst = 0.0
    while not until.done():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
    return worst


async def snapshot_pause(keys: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        storage = NamespacedStorage()
        persistence = Persistence.open(Path(directory), "no")
        persistence.recover(storage)
        for i in range(keys):
            storage.set(("bench",), f"key-{i:016d}", VALUE, ttl=3600)
        persistence.commit()
        idle = asyncio.ensure_future(asyncio.sleep(1.0))
        idle_stall = await longest_stall(idle)
        started = time.perf_counter()
        snapshot = asyncio.ensure_future(persistence.snapshot(storage))
        stall = await longest_stall(snapshot)
        await snapshot
        took = time.perf_counter() - started
        persistence.close()
        started = time.perf_counter()
        recovered = NamespacedStorage()
        persistence = Persistence.open(Path(directory), "no")
        persistence.recover(recovered)
        recovery = time.perf_counter() - started
        persistence.close()
        assert recovered.count() == keys
    return {
        "keys": keys,
        "snapshot_s": took,
        "longest_stall_ms": stall * 1000,
        "idle_longest_stall_ms": idle_stall * 1000,
        "recovery_s": recovery,
    }


async def write_until(target: str, name: str, stop: asyncio.Event) -> int:
    written = 0
    async with GrpcStore.with_client(target, timeout=10) as store:
        while not stop.is_set():
            try:
                await store.set_many({f"{name}-{written + i}": VALUE for i in range(50)})
            except StoreUnavailableError:
                break
            written += 50
    return written


async def snapshots_under_load(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        server = ServerProcess("--data-dir", directory, "--snapshot-interval", "0.3").start()
        stop = asyncio.Event()
        writers = [asyncio.create_task(write_until(server.target, f"w{n}", stop)) for n in range(20)]
        await asyncio.sleep(seconds)
        stop.set()
        written = sum(await asyncio.gather(*writers))
        server.stop()
    completed = sum(bool(re.search(r"snapshot of \d+ entries written", line)) for line in server.log)
    failed = sum("snapshot failed" in line for line in server.log)
    return {
        "seconds": seconds,
        "writes": written,
        "snapshots_completed": completed,
        "snapshots_failed": failed,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot", description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    args = parser.parse_args()
    results = {
        "pause": await snapshot_pause(args.keys),
        "under_load": await snapshots_under_load(args.load_seconds),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
