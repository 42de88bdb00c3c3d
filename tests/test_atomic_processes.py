"""Atomic operations hold across OS processes, each with its own GrpcStore, started together:
8 processes x 500 concurrent increments of one key sum to exactly 4,000, with every value from
1 to 4,000 returned once (through one server, and through a cluster from routing clients and
clients pinned to a node that forwards to the key's owner); among 100 concurrent set_if_absent
calls from 4 processes exactly one stores; a compare-and-set with a version that another
process's write made stale stores nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from nestkv.client import GrpcStore
from nestkv.wire.placement import Placement
from tests.clusterproc import ClusterProcesses
from tests.serverproc import ServerProcess

Spec = dict[str, Any]

KEY = "counter"
PROCESSES = 8
INCREMENTS = 500
BATCH = 16
"""Each process's max_batch_size: its 500 increments go in ~32 batches, which interleave with
the other processes' at the server (a batch of 500 would be one message, over in a blink)."""
START_WITHIN = 120.0
"""Seconds for every process to start and warm up: 8 Python processes on 2 busy cores are slow."""

# The client process: `python -c CHILD SPEC_JSON`. It imports nestkv only (not tests/, which an
# installed wheel's environment does not have), opens its store, warms it up (a routing store
# learns the cluster), says so with the file `ready-NAME`, waits for the file `go`, runs its
# operations (increments and set_if_absent: half of them, then the rest once every process has
# started) and prints one JSON line. Spawned, not forked: it shares no gRPC state with pytest.
CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path

import grpc

from nestkv.client import GrpcStore, channel_options

async def wait_for(path):
    while not path.exists():
        await asyncio.sleep(0.002)

async def in_two_halves(place, spec, call, arguments):
    # The first half, then, once every process has started (the file started-NAME), the second:
    # each process's calls span the moment the last one started, however the machine schedules.
    (place / f"started-{spec['name']}").touch()
    half = len(arguments) // 2
    first = await asyncio.gather(*(call(argument) for argument in arguments[:half]))
    while len(list(place.glob("started-*"))) < spec["processes"]:
        await asyncio.sleep(0.002)
    return first + await asyncio.gather(*(call(argument) for argument in arguments[half:]))

async def main(spec):
    place = Path(spec["directory"])
    channel = None
    if spec["pinned"]:
        channel = grpc.aio.insecure_channel(spec["target"], options=channel_options())
        root = GrpcStore(channel, max_batch_size=spec["batch"])
    else:
        root = GrpcStore.with_client(spec["target"], max_batch_size=spec["batch"])
    store = root.with_namespace(spec["namespace"])
    key = spec["key"]
    out = {"name": spec["name"]}
    try:
        await store.exists("warm-up")  # opens the channel; a routing store asks for the topology
        if spec["route"]:
            deadline = time.monotonic() + 30
            while root._connection.every_node()[1] is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the routing store did not learn the cluster")
                await store.exists("warm-up")
                await asyncio.sleep(0.01)
        out["routed_nodes"] = len(root._connection.every_node()[1] or ())
        mode = spec["mode"]
        if mode == "cas":
            read = await store.get_with_version(key)
            out["read"] = [read.value.decode(), read.version.hex()]
        (place / f"ready-{spec['name']}").touch()
        if spec.get("wait", True):
            await wait_for(place / "go")
        out["started"] = time.monotonic()
        if mode == "increment":
            increment = lambda _: store.increment(key)
            out["values"] = await in_two_halves(place, spec, increment, range(spec["count"]))
        elif mode == "set_if_absent":
            values = [f"{spec['name']}-{n}" for n in range(spec["count"])]
            set_if_absent = lambda value: store.set_if_absent(key, value)
            stored = await in_two_halves(place, spec, set_if_absent, values)
            out["stored"] = [value for value, ok in zip(values, stored) if ok]
        elif mode == "cas":
            version = bytes.fromhex(out["read"][1])
            out["stale_cas"] = await store.compare_and_set(key, spec["value"], version)
            out["after_stale_cas"] = (await store.get(key)).decode()
            fresh = await store.get_with_version(key)
            out["fresh_cas"] = await store.compare_and_set(key, spec["value"], fresh.version)
        elif mode == "set":
            await store.set(key, spec["value"])
        else:
            raise ValueError(mode)
        out["ended"] = time.monotonic()
    finally:
        await root.close()
        if channel is not None:
            await channel.close()
    print(json.dumps(out), flush=True)

asyncio.run(main(json.loads(sys.argv[1])))
"""


def spawn(directory: Path, spec: Spec) -> subprocess.Popen[str]:
    """A client process running `spec` (see CHILD); its files go in `directory`."""
    full = {"directory": str(directory), "batch": BATCH, "route": False, "pinned": False, **spec}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(full)],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 60) -> Spec:
    """The JSON line of a client process that ran to its end."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"client process failed ({process.returncode}):\n{stdout}\n{stderr}"
    result: Spec = json.loads(stdout)
    return result


def wait_ready(directory: Path, processes: dict[str, subprocess.Popen[str]]) -> None:
    """Until every process said it is ready (one that ended meanwhile fails the test)."""
    deadline = time.monotonic() + START_WITHIN
    for name, process in processes.items():
        while not (directory / f"ready-{name}").exists():
            if process.poll() is not None:
                finish(process)  # fails with its output
                raise AssertionError(f"{name} ended before it was ready")
            assert time.monotonic() < deadline, f"{name} was not ready within {START_WITHIN} s"
            time.sleep(0.01)


def run_together(directory: Path, specs: list[Spec]) -> list[Spec]:
    """Start a process per spec, let them all go at once when all are warm, and gather their lines.

    Each process makes half its calls, waits until every process has started, and makes the other
    half: their runs overlap even if the machine runs one process long before another.
    """
    directory.mkdir()
    processes = {spec["name"]: spawn(directory, {**spec, "processes": len(specs)}) for spec in specs}
    try:
        wait_ready(directory, processes)
        (directory / "go").touch()
        return [finish(process) for process in processes.values()]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def check_counts(results: list[Spec]) -> None:
    """Every increment counted once: the values returned are exactly 1..4000, none twice."""
    values = [value for result in results for value in result["values"]]
    assert all(len(result["values"]) == INCREMENTS for result in results)
    assert len(values) == len(set(values)) == PROCESSES * INCREMENTS
    assert set(values) == set(range(1, PROCESSES * INCREMENTS + 1))
    # The processes ran at the same time: their runs overlap (as run_together makes sure), and
    # some process's values are not one unbroken run (the server took others' between its own).
    assert any(max(r["values"]) - min(r["values"]) + 1 > INCREMENTS for r in results), [
        (min(r["values"]), max(r["values"])) for r in results
    ]
    assert max(r["started"] for r in results) < min(r["ended"] for r in results)


async def final_value(target: str, namespace: str, key: str) -> bytes | None:
    async with GrpcStore.with_client(target) as root:
        store = root.with_namespace(namespace)
        value = await store.get(key)
        await store.delete_all()
    return value


def increment_specs(namespace: str, targets: list[tuple[str, bool, bool]]) -> list[Spec]:
    """One spec per (target, pinned, route), each process `INCREMENTS` increments of KEY."""
    return [
        {
            "name": f"p{n}",
            "mode": "increment",
            "target": target,
            "pinned": pinned,
            "route": route,
            "namespace": namespace,
            "key": KEY,
            "count": INCREMENTS,
        }
        for n, (target, pinned, route) in enumerate(targets)
    ]


async def test_increments_from_8_processes_through_one_server_all_count(
    server: ServerProcess, tmp_path: Path
) -> None:
    namespace = f"atomic-{uuid.uuid4().hex}"
    specs = increment_specs(namespace, [(server.target, False, False)] * PROCESSES)
    results = await asyncio.to_thread(run_together, tmp_path / "run", specs)
    check_counts(results)
    assert await final_value(server.target, namespace, KEY) == b"4000"


def cluster_targets(cluster: ClusterProcesses, namespace: str) -> list[tuple[str, bool, bool]]:
    """Half the processes route (given node-0); half are pinned to the nodes that do not own KEY,
    which forward each increment to its owner."""
    owner = Placement(list(cluster.ports)).owner((namespace,), KEY)
    others = [member for member in cluster.ports if member != owner]
    routing = [(cluster.target("node-0"), False, True)] * (PROCESSES // 2)
    pinned = [(cluster.target(others[n % len(others)]), True, False) for n in range(PROCESSES // 2)]
    return [pair for both in zip(routing, pinned, strict=True) for pair in both]


async def test_increments_from_8_processes_through_a_cluster_all_count(
    cluster: ClusterProcesses, tmp_path: Path
) -> None:
    namespace = f"atomic-{uuid.uuid4().hex}"
    specs = increment_specs(namespace, cluster_targets(cluster, namespace))
    results = await asyncio.to_thread(run_together, tmp_path / "run", specs)
    check_counts(results)
    routed = [result["routed_nodes"] for result, spec in zip(results, specs, strict=True) if spec["route"]]
    assert routed == [len(cluster.ports)] * (PROCESSES // 2)
    assert await final_value(cluster.target("node-1"), namespace, KEY) == b"4000"


@pytest.mark.parametrize("where", ["server", "cluster"])
async def test_one_of_100_set_if_absent_from_4_processes_stores(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    namespace = f"atomic-{uuid.uuid4().hex}"
    if where == "server":
        target = request.getfixturevalue("server").target
        targets = [(target, False, False)] * 4
    else:
        cluster: ClusterProcesses = request.getfixturevalue("cluster")
        target = cluster.target("node-0")
        targets = cluster_targets(cluster, namespace)[:4]
    specs = [
        {
            "name": f"p{n}",
            "mode": "set_if_absent",
            "target": process_target,
            "pinned": pinned,
            "route": route,
            "namespace": namespace,
            "key": "only-once",
            "count": 25,
        }
        for n, (process_target, pinned, route) in enumerate(targets)
    ]
    results = await asyncio.to_thread(run_together, tmp_path / "run", specs)
    winners = [value for result in results for value in result["stored"]]
    assert len(winners) == 1, winners
    assert max(r["started"] for r in results) < min(r["ended"] for r in results)
    assert await final_value(target, namespace, "only-once") == winners[0].encode()


async def test_compare_and_set_with_a_version_another_process_made_stale_stores_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    namespace = f"atomic-{uuid.uuid4().hex}"
    async with GrpcStore.with_client(server.target) as root:
        await root.with_namespace(namespace).set("doc", b"first")
    common = {"target": server.target, "namespace": namespace, "key": "doc"}
    directory = tmp_path / "run"
    directory.mkdir()

    def run() -> tuple[Spec, Spec]:
        # The reader reads "first" and its version, and waits; the writer replaces it; then the
        # reader's compare-and-set with the version it read.
        reader = spawn(directory, {"name": "reader", "mode": "cas", "value": "reader's", **common})
        try:
            wait_ready(directory, {"reader": reader})
            writer = finish(
                spawn(
                    directory, {"name": "writer", "mode": "set", "wait": False, "value": "writer's", **common}
                )
            )
            (directory / "go").touch()
            return finish(reader), writer
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()

    reader, _ = await asyncio.to_thread(run)
    assert reader["read"][0] == "first"
    assert len(bytes.fromhex(reader["read"][1])) == 16
    assert reader["stale_cas"] is False
    assert reader["after_stale_cas"] == "writer's"
    assert reader["fresh_cas"] is True  # read again, it stores
    assert await final_value(server.target, namespace, "doc") == b"reader's"
