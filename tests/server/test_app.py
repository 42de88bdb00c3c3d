"""The server process: command line, readiness, shutdown, active expiry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nestkv.client import GrpcStore, StoreFullError, StoreUnavailableError
from nestkv.server.app import build_server, reap_forever
from nestkv.server.config import ServerConfig
from nestkv.server.storage import NamespacedStorage
from tests.serverproc import ServerProcess


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nestkv.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_flag() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in [
        "--host",
        "--port",
        "--max-key-bytes",
        "--max-value-bytes",
        "--max-depth",
        "--max-segment-bytes",
    ]:
        assert flag in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "nestkv-server"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "usage: nestkv-server" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-depth", "0"], "Expected `int` >= 1 - at `--max-depth`"),
        (["--port", "70000"], "Expected `int` <= 65535 - at `--port`"),
        (["--max-value-bytes", "lots"], "argument --max-value-bytes: invalid int value: 'lots'"),
        (
            ["--log-level", "LOUD"],
            "--log-level: invalid choice: 'LOUD' (choose from 'DEBUG', 'INFO', 'WARNING', 'ERROR')",
        ),
        (
            ["--fsync", "sometimes"],
            "--fsync: invalid choice: 'sometimes' (choose from 'always', 'everysec', 'no')",
        ),
    ],
)
def test_invalid_flag_exits_with_a_message_naming_it(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_busy_port_is_a_clear_error() -> None:
    with ServerProcess() as first:
        result = run_cli("--port", str(first.port))
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{first.port}" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_with_exit_code_zero(signum: int) -> None:
    process = ServerProcess().start()
    assert any(f"nestkv serving on 127.0.0.1:{process.port}" in line for line in process.log)
    assert process.stop(signum) == 0
    assert "nestkv stopped" in process.log[-1]


async def test_sigterm_under_load_lets_calls_finish_or_fail_cleanly() -> None:
    process = ServerProcess().start()
    store = GrpcStore.with_client(process.target, timeout=20)
    value = b"x" * 256 * 1024
    outcomes: list[str] = []

    async def writer(n: int) -> None:
        for i in range(20):
            try:
                await store.set(f"w{n}-{i}", value)
                outcomes.append("ok")
            except StoreUnavailableError:
                outcomes.append("unavailable")
                return

    async with store:
        await store.set("warm", b"up")
        tasks = [asyncio.create_task(writer(n)) for n in range(50)]
        await asyncio.sleep(0.2)
        os.kill(process.process.pid, signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)  # nothing hangs
    assert await asyncio.to_thread(process.process.wait, 30) == 0
    assert outcomes.count("ok") > 0
    assert set(outcomes) <= {"ok", "unavailable"}


async def test_active_expiry_reclaims_keys_nobody_reads() -> None:
    storage = NamespacedStorage()
    for i in range(2000):
        storage.set(("sessions",), f"k{i}", b"v" * 100, ttl=0.05)
    storage.set(("kept",), "key", b"v")
    reaper = asyncio.create_task(reap_forever(storage, interval=0.01))
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if storage.count() == 1:
                break
    finally:
        reaper.cancel()
    assert storage.count(("sessions",)) == 0
    assert storage.count() == 1
    assert storage.index_size() == 0


async def test_the_server_reaps_expired_keys_nobody_reads() -> None:
    # Through serve(): under --max-memory with noeviction, room comes back only if the
    # server's reaper reclaims the expired keys, since nothing here reads them.
    with ServerProcess("--max-memory", "1M", "--eviction-policy", "noeviction") as server:
        async with GrpcStore.with_client(server.target) as store:
            # Room for ~900 entries of 1 KB values.
            await store.set_many({f"brief{i}": b"v" * 1000 for i in range(800)}, expires_in=1)
            with pytest.raises(StoreFullError):
                await store.set_many({f"more{i}": b"v" * 1000 for i in range(200)})
            await asyncio.sleep(2.0)
            await store.set_many({f"later{i}": b"v" * 1000 for i in range(800)})


async def test_calls_that_fail_at_shutdown_changed_nothing() -> None:
    # In process, so that the storage can be inspected after the server stopped.
    storage = NamespacedStorage()
    serving = build_server(ServerConfig(), storage)
    port = serving.server.add_insecure_port("127.0.0.1:0")
    await serving.server.start()
    completed: dict[str, bool] = {}

    async def writer(store: GrpcStore, n: int) -> None:
        for i in range(10_000):
            key = f"w{n}-{i}"
            try:
                await store.set(key, b"v")
                completed[key] = True
            except StoreUnavailableError:
                completed[key] = False
                return

    async with GrpcStore.with_client(f"127.0.0.1:{port}", timeout=20) as store:
        tasks = [asyncio.create_task(writer(store, n)) for n in range(50)]
        await asyncio.sleep(0.3)
        await serving.stop(5)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert list(completed.values()).count(False) == 50  # every writer saw the shutdown
    assert all(storage.exists((), key) is done for key, done in completed.items())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_event_loop_flag_picks_the_loop_it_serves_on(loop: str) -> None:
    async def round_trip(target: str) -> bytes | None:
        async with GrpcStore.with_client(target) as store:
            await store.set("key", b"served")
            return await store.get("key")

    with ServerProcess("--event-loop", loop) as server:
        assert asyncio.run(round_trip(server.target)) == b"served"
    assert any(f"event loop {loop}" in line for line in server.log), server.log
