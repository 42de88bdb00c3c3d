"""Fault injection against a cluster with --replicas 2 (tests/faults.py): nodes killed, paused, cut
off and restarted one at a time, under writers with unique values and readers, through clients that
route and clients pinned to one node. No acknowledged write is lost, no read is stale, no write
its client was told was not applied is ever seen; the figures per fault are printed.

`make test` runs four faults; `make soak` (NESTKV_SOAK=1) sixteen, on more keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from tests.faults import FaultCluster, History, check, final_values, nemesis, pinned, reader, routed, writer

SOAK = bool(os.environ.get("NESTKV_SOAK"))
ROUNDS = 16 if SOAK else 4
KEYS = 2_000 if SOAK else 200
WRITERS = 16
READERS = 8
TIMEOUT = 2.0  # the clients' deadline, as in the issue's run


async def test_faults_one_node_at_a_time_lose_no_write_and_serve_no_stale_read(tmp_path: Path) -> None:
    cluster = FaultCluster(tmp_path, 3, "--replicas", "2", "--fsync", "no")
    await cluster.start()
    history = History()
    stop = asyncio.Event()
    try:
        async with contextlib.AsyncExitStack() as stores:
            clients = []
            for number in range(4):  # two routing by the topology, two pinned to a node each
                member = cluster.members[number % 3]
                make = routed if number % 2 == 0 else pinned
                store = await stores.enter_async_context(make(cluster.target(member), TIMEOUT))
                clients.append(("" if make is routed else member, store))
            keys = [f"key-{number}" for number in range(KEYS)]
            tasks = [
                asyncio.create_task(writer(clients[n % 4], keys[n::WRITERS], f"w{n}", history, stop))
                for n in range(WRITERS)
            ]
            tasks += [
                asyncio.create_task(reader(clients[n % 4], keys, history, stop)) for n in range(READERS)
            ]
            await asyncio.sleep(2)  # the clients find the topology, the writers get going
            await nemesis(cluster, history, ROUNDS, fault_seconds=3.0, calm_seconds=4.0)
            stop.set()
            await asyncio.gather(*tasks)
        final = await final_values(cluster, keys)
    finally:
        await cluster.close()
    report = check(history, final, cluster.placement)
    print(report.summary())
    assert report.writes_acknowledged > 1_000
    assert report.lost == []
    assert report.stale == []
    assert report.failed_seen == []


async def test_a_rolling_restart_of_every_node_under_traffic_fails_no_operation(tmp_path: Path) -> None:
    cluster = FaultCluster(tmp_path, 3, "--replicas", "2", "--fsync", "no", proxied=False)
    await cluster.start()
    history = History()
    stop = asyncio.Event()
    try:
        async with contextlib.AsyncExitStack() as stores:
            clients = [
                ("", await stores.enter_async_context(routed(cluster.target(member), TIMEOUT)))
                for member in cluster.members
            ]
            keys = [f"key-{number}" for number in range(KEYS)]
            tasks = [
                asyncio.create_task(writer(clients[n % 3], keys[n::WRITERS], f"w{n}", history, stop))
                for n in range(WRITERS)
            ]
            tasks += [
                asyncio.create_task(reader(clients[n % 3], keys, history, stop)) for n in range(READERS)
            ]
            await asyncio.sleep(2)
            for member in cluster.members:  # as a StatefulSet rolls: one after the other, each back first
                await cluster.terminate(member)
                await cluster.start_node(member)
                await cluster.caught_up(member)
            await asyncio.sleep(1)
            stop.set()
            await asyncio.gather(*tasks)
        final = await final_values(cluster, keys)
    finally:
        await cluster.close()
    report = check(history, final, cluster.placement)
    failed = [op.error for op in history.ops if not op.ok]
    print(report.summary(), f"\n{len(history.ops)} operations, {len(failed)} failed", *failed[:5], sep="\n")
    assert report.writes_acknowledged > 1_000
    assert failed == []
    assert report.lost == []
    assert report.stale == []
