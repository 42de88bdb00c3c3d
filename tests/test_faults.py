"""Fault injection against a cluster with --replicas 2 (tests/faults.py): nodes killed, paused, cut
off and restarted one at a time, under writers with unique values and readers, through clients that
route and clients pinned to one node. No acknowledged write is lost, no read is stale, no write
its client was told was not applied is ever seen; the figures per fault are printed.

`make test` runs four faults; `make soak` (NESTKV_SOAK=1) sixteen, on more keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.faults import FaultCluster, History, check, final_values, nemesis, pinned, reader, routed, writer

SOAK = bool(os.environ.get("NESTKV_SOAK"))
ROUNDS = 16 if SOAK else 4
KEYS = 2_000 if SOAK else 200
WRITERS = 16
READERS = 8
TIMEOUT = 2.0  # the clients' deadline, as in the issue's run


async def run_under_traffic(
    cluster: FaultCluster, clients: list[tuple[str, bool]], faults: Callable[[History], Awaitable[None]]
) -> History:
    """Start `cluster`, run the writers and readers through `clients` ((node, pinned) each: pinned
    to the node, or routing from it) while `faults(history)` runs, then read every key's final
    value into `history`, and stop the cluster."""
    await cluster.start()
    history = History()
    stop = asyncio.Event()
    keys = [f"key-{number}" for number in range(KEYS)]
    try:
        async with contextlib.AsyncExitStack() as stores:
            opened = []
            for member, is_pinned in clients:
                make = pinned if is_pinned else routed
                store = await stores.enter_async_context(make(cluster.target(member), TIMEOUT))
                opened.append((member if is_pinned else "", store))
            count = len(opened)
            tasks = [
                asyncio.create_task(writer(opened[n % count], keys[n::WRITERS], f"w{n}", history, stop))
                for n in range(WRITERS)
            ]
            tasks += [
                asyncio.create_task(reader(opened[n % count], keys, history, stop)) for n in range(READERS)
            ]
            await asyncio.sleep(2)  # the clients find the topology, the writers get going
            await faults(history)
            stop.set()
            await asyncio.gather(*tasks)
        history.final = await final_values(cluster, keys)
    finally:
        await cluster.close()
    return history


async def test_faults_one_node_at_a_time_lose_no_write_and_serve_no_stale_read(tmp_path: Path) -> None:
    cluster = FaultCluster(tmp_path, 3, "--replicas", "2", "--fsync", "no")
    # Two clients routing by the topology, two pinned to a node each.
    clients = [(cluster.members[number % 3], number % 2 == 1) for number in range(4)]

    async def faults(history: History) -> None:
        await nemesis(cluster, history, ROUNDS, fault_seconds=3.0, calm_seconds=4.0)

    history = await run_under_traffic(cluster, clients, faults)
    report = check(history, history.final, cluster.placement)
    print(report.summary())
    assert report.writes_acknowledged > 1_000
    assert report.lost == []
    assert report.stale == []
    assert report.failed_seen == []


async def test_a_rolling_restart_of_every_node_under_traffic_fails_no_operation(tmp_path: Path) -> None:
    cluster = FaultCluster(tmp_path, 3, "--replicas", "2", "--fsync", "no", proxied=False)

    async def roll(history: History) -> None:
        for member in cluster.members:  # as a StatefulSet rolls: one after the other, each back first
            await cluster.terminate(member)
            await cluster.start_node(member)
            await cluster.caught_up(member)
        await asyncio.sleep(1)

    history = await run_under_traffic(cluster, [(member, False) for member in cluster.members], roll)
    report = check(history, history.final, cluster.placement)
    failed = [op.error for op in history.ops if not op.ok]
    print(report.summary(), f"\n{len(history.ops)} operations, {len(failed)} failed", *failed[:5], sep="\n")
    assert report.writes_acknowledged > 1_000
    assert failed == []
    assert report.lost == []
    assert report.stale == []
