"""`make cluster N=...`: N nodes on this machine, on consecutive ports, one store to a client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from nestkv.client import GrpcStore
from tests.polling import eventually
from tests.serverproc import READY

ROOT = Path(__file__).parents[1]


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first: int = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no consecutive free ports")


def make_cluster(size: int, port: int, directory: Path) -> subprocess.Popen[str]:
    """`make cluster` as a developer runs it, in a process group of its own (for Ctrl-C)."""
    return subprocess.Popen(
        [
            "make",
            "--no-print-directory",
            "cluster",
            f"N={size}",
            f"CLUSTER_PORT={port}",
            f"CLUSTER_DIR={directory}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("stop", ["Ctrl-C", "kill of make"])
async def test_make_cluster_starts_n_nodes_that_serve_one_store_and_stop_together(
    tmp_path: Path, stop: str
) -> None:
    port = consecutive_free_ports(2)
    process = make_cluster(2, port, tmp_path)
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.extend(line.rstrip("\n") for line in process.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        await eventually(lambda: sum(bool(READY.search(line)) for line in lines) == 2, within=60)
        ports = sorted(int(match["port"]) for line in lines if (match := READY.search(line)))
        assert ports == [port, port + 1]
        assert (tmp_path / "members").read_text() == f"node-0=127.0.0.1:{port}\nnode-1=127.0.0.1:{port + 1}\n"
        async with GrpcStore.with_client(f"127.0.0.1:{port + 1}") as store:
            await store.set_many({f"k{n}": b"v" for n in range(50)})
            stats = await store.stats()
        assert set(stats.nodes) == {"node-0", "node-1"}
        assert all(figures.server.keys > 0 for figures in stats.nodes.values())
        assert stats.server.keys == 50
        assert {"node-0", "node-1"} <= set(os.listdir(tmp_path))  # a data directory each
    finally:
        if stop == "Ctrl-C":  # the terminal signals the foreground process group
            os.killpg(process.pid, signal.SIGINT)
        else:  # `kill` of make alone: the nodes go with it all the same
            process.terminate()
        process.wait(30)
        reader.join(10)
    # Each node stopped as it does under Kubernetes, and every line says which node wrote it.
    for node in ("node-0", "node-1"):
        assert any(line.startswith(f"{node} | ") and "nestkv stopped" in line for line in lines), lines[-10:]
    assert all(line.startswith(("node-0 | ", "node-1 | ", "exec ")) for line in lines), lines[:5]
    assert not _still_running(tmp_path)


def _still_running(directory: Path) -> list[str]:
    """The command lines of the live processes that name `directory`'s data directories."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not a process
        if f"--data-dir {directory}/node-" in command:
            found.append(command)
    return found
