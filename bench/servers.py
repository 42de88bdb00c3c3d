"""The servers a benchmark run measures: a nestkv server and, where one is installed, a redis-server."""

from __future__ import annotations

import contextlib
import importlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.serverproc import ServerProcess


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def nestkv_server(*args: str) -> Iterator[ServerProcess]:
    with ServerProcess("--log-level", "INFO", *args) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, no memory limit."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    def client(self, **options: Any) -> Any:
        from redis.asyncio import Redis

        return Redis(host="127.0.0.1", port=self.port, **options)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer | str]:
    """A RedisServer, or the reason there is none (printed in place of the Redis rows)."""
    missing = _missing("redis-server", "litestar.stores.redis")
    if missing:
        yield missing
        return
    executable = str(shutil.which("redis-server"))
    port = _free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    yield f"redis-server did not start on port {port}"
                    return
                time.sleep(0.05)
        yield RedisServer(process, port)
    finally:
        process.terminate()
        process.wait(10)


class RedisCluster:
    """A throwaway Redis Cluster on free loopback ports: `masters` masters, each with `replicas`
    replicas (asynchronous, as Redis Cluster's are), made by `redis-cli --cluster create`."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def client(self, **options: Any) -> Any:
        from redis.asyncio.cluster import RedisCluster as Client

        return Client(host="127.0.0.1", port=self.ports[0], **options)


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3, replicas: int = 0) -> Iterator[RedisCluster | str]:
    """A RedisCluster, or the reason there is none (printed in place of its rows)."""
    missing = _missing("redis-cli", "redis.asyncio.cluster")
    if missing:
        yield missing
        return
    server, cli = str(shutil.which("redis-server")), str(shutil.which("redis-cli"))
    ports = _cluster_ports(masters * (1 + replicas))
    processes = []
    try:
        for port in ports:
            place = directory / f"redis-{port}"
            place.mkdir()
            command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            command += ["--cluster-enabled", "yes", "--cluster-config-file", str(place / "nodes.conf")]
            command += ["--dir", str(place)]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            if not _listening(port, 10):
                yield f"redis-server did not start on port {port}"
                return
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports)]
        created = subprocess.run(
            [*create, "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            yield f"redis-cli --cluster create failed: {created.stdout[-300:]} {created.stderr[-300:]}"
            return
        deadline = time.monotonic() + 30
        while "cluster_state:ok" not in _cluster_info(cli, ports[0]):
            if time.monotonic() > deadline:
                yield "the Redis Cluster did not reach cluster_state:ok in 30 s"
                return
            time.sleep(0.2)
        yield RedisCluster(ports)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def _missing(program: str, module: str) -> str:
    """Why Redis cannot be measured here ("": it can): redis-server and `program` are installed,
    and the Python module `module` (and redis-py) can be imported."""
    if shutil.which("redis-server") is None or shutil.which(program) is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    try:
        importlib.import_module("redis")
        importlib.import_module(module)
    except ImportError as missing:
        return f"{missing.name} is not installed (pip install -e '.[bench]')"
    return ""


def _cluster_ports(count: int) -> list[int]:
    """`count` loopback ports free, each with its cluster bus port (10000 above it) free too."""
    ports: list[int] = []
    for port in random.Random().sample(range(20_000, 40_000), 400):
        if all(_free(candidate) for candidate in (port, port + 10_000)):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports with their cluster bus ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _cluster_info(cli: str, port: int) -> str:
    done = subprocess.run(
        [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10, check=False
    )
    return done.stdout
