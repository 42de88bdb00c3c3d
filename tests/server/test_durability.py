"""A server with --data-dir, stopped, killed and restarted: what it promises to keep, it keeps."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nestkv.client import GrpcStore, StoreUnavailableError
from nestkv.server.app import build_server
from nestkv.server.config import ServerConfig
from nestkv.server.storage import NamespacedStorage
from nestkv.server.storage.persistence import Persistence
from tests.clusterproc import free_ports
from tests.polling import eventually
from tests.server.storage.test_persistence import break_log, mend_log
from tests.serverproc import ServerProcess, server_command

_SNAPSHOT_WRITTEN = re.compile(r"snapshot of \d+ entries written")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return server_command("--port", "0", *args)


async def write_until_stopped(target: str, name: str, acknowledged: list[str], stop: asyncio.Event) -> None:
    """Write distinct keys until `stop` or the server goes away; record each acknowledged write."""
    async with GrpcStore.with_client(target, timeout=10) as store:
        i = 0
        while not stop.is_set():
            key = f"{name}-{i}"
            try:
                await store.with_namespace("load").set(key, key)
            except StoreUnavailableError:
                return
            acknowledged.append(key)
            i += 1


async def missing_after_restart(directory: Path, keys: list[str]) -> list[str]:
    with ServerProcess("--data-dir", str(directory)) as server:
        async with GrpcStore.with_client(server.target) as store:
            values = await store.with_namespace("load").get_many(keys)
    return [key for key, value in zip(keys, values, strict=True) if value != key.encode()]


async def test_data_and_time_left_survive_a_restart(tmp_path: Path) -> None:
    with ServerProcess("--data-dir", str(tmp_path)) as server:
        async with GrpcStore.with_client(server.target) as store:
            await store.with_namespace("a").with_namespace("b").set("plain", b"kept")
            await store.with_namespace("a").set("session", b"s", expires_in=10)
            await store.with_namespace("a").set("brief", b"b", expires_in=1)
            await store.with_namespace("dropped").set("key", b"v")
            await store.with_namespace("dropped").delete_all()
    await asyncio.sleep(1.5)  # the server is down: "brief" expires meanwhile
    with ServerProcess("--data-dir", str(tmp_path)) as server:
        async with GrpcStore.with_client(server.target) as store:
            assert await store.with_namespace("a").with_namespace("b").get("plain") == b"kept"
            assert await store.with_namespace("a").expires_in("plain") is None
            assert await store.with_namespace("a").get("brief") is None
            assert await store.with_namespace("dropped").get("key") is None
            left = await store.with_namespace("a").expires_in("session")
            assert left is not None
            assert 7 <= left <= 9  # about 10 s minus the outage: deadlines are wall-clock instants


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_every_acknowledged_write_survives_sigkill(tmp_path: Path, fsync: str) -> None:
    # A crash of the process (not of the machine): in every fsync policy the
    # records reach the OS before the write is answered.
    acknowledged: list[str] = []
    stop = asyncio.Event()
    server = ServerProcess(
        "--data-dir", str(tmp_path), "--fsync", fsync, "--snapshot-interval", "0.3"
    ).start()
    writers = [
        asyncio.create_task(write_until_stopped(server.target, f"w{n}", acknowledged, stop))
        for n in range(20)
    ]
    await eventually(lambda: snapshots_written(server) >= 3)  # snapshots complete under the writes
    server.process.send_signal(signal.SIGKILL)
    async with asyncio.timeout(30):
        await asyncio.gather(*writers)
    assert server.process.wait(10) == -signal.SIGKILL
    assert not [line for line in server.log if "snapshot failed" in line]
    assert len(acknowledged) > 100
    assert await missing_after_restart(tmp_path, acknowledged) == []


def glob_names(directory: Path, pattern: str) -> list[str]:
    return [path.name for path in directory.glob(pattern)]


def snapshots_written(server: ServerProcess) -> int:
    return sum(bool(_SNAPSHOT_WRITTEN.search(line)) for line in server.log)


async def test_sigterm_during_a_snapshot_exits_cleanly_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # 200k keys take a snapshot ~0.15 s to write; the next one starts 0.05 s after one ends.
    server = ServerProcess(
        "--data-dir", str(tmp_path), "--snapshot-interval", "0.05", "--shutdown-grace", "3"
    ).start()
    async with GrpcStore.with_client(server.target, timeout=30) as store:
        for start in range(0, 200_000, 10_000):
            await store.with_namespace("bulk").set_many(
                {f"k{i}": b"v" * 50 for i in range(start, start + 10_000)}
            )
        acknowledged: list[str] = []
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(write_until_stopped(server.target, f"w{n}", acknowledged, stop))
            for n in range(4)
        ]
        before = snapshots_written(server)
        await eventually(lambda: snapshots_written(server) > before)  # one of all 200k keys completed
        await asyncio.sleep(0.1)  # the next one is under way
        os.kill(server.process.pid, signal.SIGTERM)
        async with asyncio.timeout(30):
            await asyncio.gather(*writers)
    assert await asyncio.to_thread(server.process.wait, 3 + 10) == 0  # the grace period, then the snapshot
    assert glob_names(tmp_path, "*.tmp") == []
    assert [line for line in server.log if "snapshot cut short by the server stopping" in line]
    assert not [line for line in server.log if "snapshot failed" in line or "Traceback" in line]
    assert await missing_after_restart(tmp_path, acknowledged) == []
    with ServerProcess("--data-dir", str(tmp_path)) as restarted:
        async with GrpcStore.with_client(restarted.target) as store:
            assert await store.with_namespace("bulk").get("k199999") == b"v" * 50


async def test_sigterm_under_load_loses_no_completed_write(tmp_path: Path) -> None:
    acknowledged: list[str] = []
    stop = asyncio.Event()
    server = ServerProcess("--data-dir", str(tmp_path)).start()
    writers = [
        asyncio.create_task(write_until_stopped(server.target, f"c{n}", acknowledged, stop))
        for n in range(100)
    ]
    await asyncio.sleep(1.0)
    os.kill(server.process.pid, signal.SIGTERM)
    async with asyncio.timeout(30):  # none hangs: each call completes or gets StoreUnavailableError
        await asyncio.gather(*writers)
    assert await asyncio.to_thread(server.process.wait, 30) == 0
    assert len(acknowledged) > 100
    assert await missing_after_restart(tmp_path, acknowledged) == []


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with ServerProcess("--data-dir", str(tmp_path)) as first:
        result = run_cli("--data-dir", str(tmp_path))
        assert result.returncode == 1
        assert f"data directory {tmp_path} is in use by another nestkv server (pid {first.process.pid})" in (
            result.stderr
        )


def test_a_corrupt_snapshot_stops_the_server_from_starting(tmp_path: Path) -> None:
    async def fill(target: str) -> None:
        async with GrpcStore.with_client(target) as store:
            await store.set_many({f"k{i}": b"v" * 100 for i in range(100)})

    with ServerProcess("--data-dir", str(tmp_path)) as server:
        asyncio.run(fill(server.target))
    snapshot = tmp_path / "snapshot.msgpack"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x40
    snapshot.write_bytes(bytes(data))
    result = run_cli("--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "is damaged at byte" in result.stderr
    assert "Refusing to start rather than start without its data" in result.stderr
    assert snapshot.read_bytes() == bytes(data)  # left as it was, for whoever repairs it


def test_without_data_dir_nothing_is_written(tmp_path: Path) -> None:
    with ServerProcess() as server:
        cwd_files = set(Path.cwd().iterdir())
        asyncio.run(_set_one(server.target))
    assert set(Path.cwd().iterdir()) == cwd_files


async def _set_one(target: str) -> None:
    async with GrpcStore.with_client(target) as store:
        await store.set("key", b"v")


async def test_while_the_log_cannot_be_written_writes_fail_and_reads_work(tmp_path: Path) -> None:
    storage = NamespacedStorage()
    persistence = Persistence.open(tmp_path, "always")
    persistence.recover(storage)
    serving = build_server(ServerConfig(), storage, persistence)
    port = serving.server.add_insecure_port("127.0.0.1:0")
    await serving.server.start()
    try:
        async with GrpcStore.with_client(f"127.0.0.1:{port}") as store:
            await store.set("kept", b"v")
            good = break_log(persistence, tmp_path)
            with pytest.raises(StoreUnavailableError, match="cannot write the log"):
                await store.set("refused", b"v")
            with pytest.raises(StoreUnavailableError, match="refuses writes"):
                await store.delete("kept")
            assert await store.get("kept") == b"v"  # reads still work
            mend_log(persistence, good)
            await store.set("after", b"v")
            assert await store.get_many(["kept", "after"]) == [b"v", b"v"]
    finally:
        await serving.stop(1)
        persistence.close()


def test_a_node_away_longer_than_the_tombstone_age_refuses_its_data_directory(tmp_path: Path) -> None:
    """Other nodes may have forgotten deletes of its keys: it would bring them back."""
    storage = NamespacedStorage()
    persistence = Persistence.open(tmp_path, "always")
    persistence.recover(storage)
    storage.set(("ns",), "k", b"kept while the node was away")
    persistence.commit()
    persistence.close()
    two_hours_ago = int((time.time() - 7200) * 1000) << 16
    (tmp_path / "clock").write_bytes(two_hours_ago.to_bytes(8, "big"))
    [port] = free_ports(1)
    cluster = (
        "--port",
        str(port),
        "--node-id",
        "a",
        "--cluster",
        f"a=127.0.0.1:{port}",
        "--data-dir",
        str(tmp_path),
    )
    result = run_cli(*cluster, "--tombstone-age", "3600")
    assert result.returncode == 1
    assert re.search(
        r"its server stopped 72\d\d s ago, longer than --tombstone-age \(3600 s\)", result.stderr
    )
    assert "Move the directory away to start empty" in result.stderr
    # A single server keeps its data however long it was away (its copies never meet), and so
    # does a node given a tombstone age longer than its absence.
    for args in (("--data-dir", str(tmp_path)), (*cluster, "--tombstone-age", "9000")):
        with ServerProcess(*args) as server:
            assert asyncio.run(read_one(server.target)) == b"kept while the node was away"


async def read_one(target: str) -> bytes | None:
    async with GrpcStore.with_client(target) as store:
        return await store.with_namespace("ns").get("k")
