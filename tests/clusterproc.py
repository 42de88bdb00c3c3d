"""Run a cluster of real server processes on this machine, as `make cluster` does, for tests."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.serverproc import ServerProcess


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ClusterProcesses:
    """Nodes `node-0` ... `node-(N-1)` on consecutive free ports, one members file, a data dir each."""

    def __init__(self, directory: Path, size: int, *args: str, data: bool = True) -> None:
        self.directory = directory
        self.args: Sequence[str] = args
        self.data = data
        self.members_file = directory / "members"
        self.ports: dict[str, int] = {}
        self.nodes: dict[str, ServerProcess] = {}
        self.add_members(size)

    def add_members(self, count: int, *, listed: bool = True) -> list[str]:
        """Give `count` more nodes ports and (`listed`) list them in the members file (not started)."""
        first = len(self.ports)
        new = [f"node-{n}" for n in range(first, first + count)]
        self.ports.update(zip(new, free_ports(count), strict=True))
        if listed:
            self.write_members(list(self.ports))
        return new

    def write_members(self, members: Sequence[str], path: Path | None = None) -> None:
        """List `members` in the members file (replaced whole, as a ConfigMap update does)."""
        path = path or self.members_file
        text = "".join(f"{member}=127.0.0.1:{self.ports[member]}\n" for member in members)
        staged = path.with_suffix(".new")
        staged.write_text(text)
        staged.replace(path)

    def node(self, member: str, *extra: str, members_file: Path | None = None) -> ServerProcess:
        """A process for `member` (not started), reading `members_file` (default: the shared one)."""
        listed = members_file or self.members_file
        args = ["--port", str(self.ports[member]), "--node-id", member, "--cluster", f"@{listed}"]
        if self.data:
            data_dir = self.directory / member
            data_dir.mkdir(exist_ok=True)
            args += ["--data-dir", str(data_dir)]
        return ServerProcess(*args, *self.args, *extra)

    def start(self, members: Sequence[str] | None = None) -> Self:
        for member in members if members is not None else list(self.ports):
            self.nodes[member] = self.node(member).start()
        return self

    def target(self, member: str = "node-0") -> str:
        return f"127.0.0.1:{self.ports[member]}"

    def stop(self) -> None:
        for process in self.nodes.values():
            if process._process is not None:
                process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
