"""The member list: parsed from --cluster, watched when it is a file, and who owns what under it."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from nestkv.wire.placement import Placement, topology_version

log = logging.getLogger("nestkv.server")


class ClusterConfigError(Exception):
    """--node-id or --cluster cannot be used; the message says why."""


def parse_members(text: str, where: str) -> dict[str, str]:
    """`ID=HOST:PORT` entries separated by commas or new lines (blank and `#` lines skipped)."""
    members: dict[str, str] = {}
    entries = [entry.strip() for line in text.splitlines() for entry in line.split(",")]
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        member, equals, address = entry.partition("=")
        member, address = member.strip(), address.strip()
        host, colon, port = address.rpartition(":")
        if not equals or not member or not colon or not host or not port.isdigit() or int(port) > 65535:
            raise ClusterConfigError(f"{where}: {entry!r} is not ID=HOST:PORT")
        if member in members:
            raise ClusterConfigError(f"{where}: member {member!r} is listed twice")
        members[member] = address
    if not members:
        raise ClusterConfigError(f"{where}: no members: give ID=HOST:PORT for every node, this one included")
    return members


class Topology:
    """One member list: its version, and the copies (the owner first) of every key under it."""

    __slots__ = ("members", "placement", "replicas", "version")

    def __init__(self, members: dict[str, str], replicas: int = 1) -> None:
        """`replicas`: copies kept of each key (--replicas), at most one per member."""
        self.members = dict(sorted(members.items(), key=lambda item: item[0].encode()))
        self.placement = Placement(self.members)
        self.version = topology_version(self.members)
        self.replicas = min(replicas, len(self.members))

    def owner(self, path: Sequence[str], key: str) -> str:
        return self.placement.owner(path, key)

    def others(self, member: str) -> dict[str, str]:
        """The members other than `member` (the node asking), with their addresses."""
        return {other: address for other, address in self.members.items() if other != member}

    def copies(self, path: Sequence[str], key: str) -> list[str]:
        """The members that keep a copy of the key, the owner first."""
        if self.replicas == 1:
            return [self.placement.owner(path, key)]
        return self.placement.ranked(path, key)[: self.replicas]

    def ranked(self, path: Sequence[str], key: str) -> list[str]:
        """Every member in the key's placement order: its copies, then who stands in for them."""
        return self.placement.ranked(path, key)

    def holds(self, member: str, path: Sequence[str], key: str) -> bool:
        """Whether `member` keeps a copy of the key."""
        if self.replicas == 1:
            return self.placement.owner(path, key) == member
        return member in self.copies(path, key)


class Membership:
    """This node's id and the current topology; a `@FILE` source is re-read when it changes."""

    def __init__(self, node_id: str, spec: str, replicas: int = 1) -> None:
        """`replicas`: copies kept of each key (--replicas)."""
        self.node_id = own_id(node_id)
        self.replicas = replicas
        self._file = Path(spec[1:]) if spec.startswith("@") else None
        self._seen: tuple[int, int, int] | None = None
        self.listeners: list[Callable[[Topology, Topology], None]] = []
        members = self._read() if self._file else parse_members(spec, "--cluster")
        if self.node_id not in members:
            raise ClusterConfigError(
                f"this node's id {self.node_id!r} (--node-id) is not among the members of --cluster "
                f"({', '.join(members)}): every node gets the same list, itself included"
            )
        self.current = Topology(members, replicas)

    def topology(self, members: dict[str, str]) -> Topology:
        """The topology of the member list `members`, with this cluster's replicas."""
        return Topology(members, self.replicas)

    def _read(self) -> dict[str, str]:
        assert self._file is not None
        try:
            stat = self._file.stat()
            text = self._file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ClusterConfigError(f"--cluster @{self._file}: {error}") from None
        self._seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        return parse_members(text, f"--cluster @{self._file}")

    def reload(self) -> bool:
        """Read the member file again if it changed; whether the topology changed.

        A file that cannot be used keeps the members as they were (and says why in the log).
        """
        if self._file is None:
            return False
        try:
            stat = self._file.stat()
        except OSError as error:
            log.error("kept the previous members: --cluster @%s: %s", self._file, error)
            return False
        if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._seen:
            return False
        try:
            members = self._read()
        except ClusterConfigError as error:
            log.error("kept the previous members: %s", error)
            return False
        return self.change(self.topology(members), f"@{self._file}")

    def change(self, topology: Topology, source: str) -> bool:
        """Make `topology` the current one (read from `source`); whether it differs."""
        if topology.version == self.current.version:
            return False
        previous, self.current = self.current, topology
        log.info(
            "members changed (version %s -> %s, from %s): %s%s",
            previous.version,
            topology.version,
            source,
            ", ".join(topology.members),
            "" if self.node_id in topology.members else f"; {self.node_id} is no longer one of them",
        )
        for listener in self.listeners:
            listener(previous, topology)
        return True

    async def watch_forever(self, interval: float = 1.0) -> None:
        """Re-read the member file every `interval` seconds if it changed (a ConfigMap volume, say)."""
        while True:
            await asyncio.sleep(interval)
            self.reload()


def own_id(node_id: str) -> str:
    """This node's id: `node_id` (--node-id), or else the host name (a StatefulSet's pod name)."""
    return node_id or socket.gethostname()
