"""Run the real server as a subprocess on a free port, for integration tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestkv.server.service import SERVICE_NAME

READY = re.compile(r"nestkv serving on (?P<host>[^\s\"]+):(?P<port>\d+)\b")


def server_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m nestkv.server ARGS` run to its end (a start that must fail, `token new`)."""
    return subprocess.run(
        [sys.executable, "-m", "nestkv.server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ServerProcess:
    """`python -m nestkv.server --port 0 ...`: started on enter, stopped (SIGTERM) on exit.

    `command`, if given, is the whole command line instead (a server started some other way,
    such as from the container image), and `args` are not used.
    """

    def __init__(self, *args: str, command: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        """`env`: variables set for the server besides this process's own."""
        self.args: Sequence[str] = args
        self.command: Sequence[str] = command
        self.env = env or {}
        self.port = 0
        self.log: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[str]:
        assert self._process is not None, "server not started"
        return self._process

    def start(self, timeout: float = 30.0) -> Self:
        default = [sys.executable, "-m", "nestkv.server", "--host", "127.0.0.1", "--port", "0", *self.args]
        self._process = subprocess.Popen(
            list(self.command) or default,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        ready = threading.Event()

        def read() -> None:
            assert self._process is not None
            assert self._process.stderr is not None
            for line in self._process.stderr:
                self.log.append(line.rstrip("\n"))
                match = READY.search(line.strip())
                if match:
                    self.port = int(match["port"])
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log))
        return self

    async def ready(self, within: float = 30.0) -> None:
        """Wait until the server's readiness (grpc.health.v1, StoreService) says SERVING, as a
        Kubernetes readiness probe does: with replicas, once the node is current (caught up)."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        async with grpc.aio.insecure_channel(self.target) as channel, asyncio.timeout(within):
            async for answer in health_pb2_grpc.HealthStub(channel).Watch(request):
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        raise RuntimeError("the server ended its readiness watch before it said SERVING")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `signum`, wait for the exit and return the exit code."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(5)
        return process.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
