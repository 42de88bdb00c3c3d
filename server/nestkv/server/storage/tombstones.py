"""Tombstones: what was deleted, and when, kept while an older copy may still arrive.

A delete (or an expiry) leaves a tombstone for its key with the version of
the change; a `delete_all` leaves one for its namespace. A copy that arrives
later (a hand-off, an answer of a previous owner, a log replayed) is dropped
if a tombstone over it is as new as it or newer: at equal versions the
delete wins, as Cassandra's tombstones do.

They are bounded three ways, oldest first: by age (`age` seconds after it
was buried here, by the wall clock: an expiry ages from the expiry, not from
the write), by count (`limit`), and by memory, since their bytes count in
the storage's `used_memory` and the storage drops the oldest before it
evicts an entry or refuses a write. A tombstone dropped before its age is
counted in `dropped_early`. After a tombstone is gone, an older copy of its
key that arrives is taken as news: a node that was away for longer than the
age may bring deleted keys back (the server refuses to start such a node's
data directory in a cluster: nestkv.server.app.open_persistence).

Each is kept as its version followed by the wall-clock millisecond it was
buried (8 bytes, big-endian): buried again, it goes to the end of its table
with the newer of the two versions, so each table is in the order of burial.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from nestkv.server.storage.clock import VERSION_BYTES
from nestkv.server.storage.tree import text_bytes

TOMBSTONE_OVERHEAD = 268
"""Bytes a key's tombstone costs beyond its key and namespace names: its dict slot, the
(path, key) tuple, the path tuple and the 24-byte version-and-time object (estimated for
CPython 3.11)."""


class Tombstones:
    """Deleted keys and emptied namespaces with the version of the change, oldest first."""

    __slots__ = ("_wall", "age", "bytes", "dropped_early", "keys", "limit", "subtrees")

    def __init__(self, age: float, limit: int, wall: Callable[[], float] = time.time) -> None:
        """`wall`: the wall clock, in Unix seconds (injectable for tests)."""
        self.age = age
        self.limit = limit
        self._wall = wall
        self.keys: dict[tuple[tuple[str, ...], str], bytes] = {}  # version + burial ms
        self.subtrees: dict[tuple[str, ...], bytes] = {}
        self.bytes = 0
        """Bytes the tombstones are accounted (part of NamespacedStorage.used_memory)."""
        self.dropped_early = 0
        """Tombstones dropped before their age: for room, or over the count."""

    def __len__(self) -> int:
        return len(self.keys) + len(self.subtrees)

    def over(self, path: Sequence[str], key: str) -> bytes | None:
        """The newest version that deleted `key` at `path`: its own tombstone or a namespace's above it."""
        buried = self.keys.get((tuple(path), key)) if self.keys else None
        newest = None if buried is None else buried[:VERSION_BYTES]
        if self.subtrees:
            for depth in range(len(path) + 1):
                buried = self.subtrees.get(tuple(path[:depth]))
                if buried is not None and (newest is None or buried[:VERSION_BYTES] > newest):
                    newest = buried[:VERSION_BYTES]
        return newest

    def of_subtree(self, path: Sequence[str]) -> bytes | None:
        """The version of the namespace tombstone at `path` itself, if any."""
        buried = self.subtrees.get(tuple(path)) if self.subtrees else None
        return None if buried is None else buried[:VERSION_BYTES]

    def versions(
        self,
    ) -> tuple[list[tuple[tuple[str, ...], str, bytes]], list[tuple[tuple[str, ...], bytes]]]:
        """Every key tombstone as (path, key, version), and every namespace one as (path, version)."""
        return (
            [(path, key, buried[:VERSION_BYTES]) for (path, key), buried in self.keys.items()],
            [(path, buried[:VERSION_BYTES]) for path, buried in self.subtrees.items()],
        )

    def bury(self, path: Sequence[str], key: str, version: bytes) -> None:
        """Record that `key` was deleted by the change `version` (the newer of two is kept)."""
        self._keep(self.keys, (tuple(path), key), version)

    def bury_subtree(self, path: Sequence[str], version: bytes) -> None:
        """Record that the namespace at `path` was emptied by the change `version`."""
        self._keep(self.subtrees, tuple(path), version)

    def forget(self, path: Sequence[str], key: str) -> None:
        """A newer value of `key` was stored: its tombstone can no longer decide anything."""
        name = (tuple(path), key)
        if self.keys.pop(name, None) is not None:
            self.bytes -= _size(name)

    def collect(self) -> int:
        """Drop the tombstones buried longer than `age` ago; how many."""
        horizon = int((self._wall() - self.age) * 1000)
        dropped = 0
        for table in (self.keys, self.subtrees):
            # In the order of burial: the first young one ends the table's turn.
            while table and _buried_at(next(iter(table.values()))) <= horizon:
                self._drop_first(table)
                dropped += 1
        return dropped

    def drop_oldest(self) -> bool:
        """Drop the tombstone buried first, before its age (to make room); False if there are none."""
        keys, subtrees = self.keys, self.subtrees
        if not keys and not subtrees:
            return False
        if keys and subtrees:
            first_key, first_subtree = next(iter(keys.values())), next(iter(subtrees.values()))
            self._drop_first(keys if _buried_at(first_key) <= _buried_at(first_subtree) else subtrees)
        else:
            self._drop_first(keys or subtrees)
        self.dropped_early += 1
        return True

    def _keep(self, table: dict[Any, bytes], name: Any, version: bytes) -> None:
        old = table.pop(name, None)
        if old is None:
            self.bytes += _size(name)
        elif old[:VERSION_BYTES] > version:
            version = old[:VERSION_BYTES]
        # To the end, buried now: the order is that of burial.
        table[name] = version + int(self._wall() * 1000).to_bytes(8, "big")
        while len(self) > self.limit:
            self.drop_oldest()

    def _drop_first(self, table: dict[Any, bytes]) -> None:
        name = next(iter(table))
        del table[name]
        self.bytes -= _size(name)


def _buried_at(buried: bytes) -> int:
    return int.from_bytes(buried[VERSION_BYTES:], "big")


def _size(name: tuple[tuple[str, ...], str] | tuple[str, ...]) -> int:
    """Bytes a tombstone of `name` ((path, key) or a namespace's path) is accounted."""
    if len(name) == 2 and isinstance(name[0], tuple):
        path, key = name
        return TOMBSTONE_OVERHEAD + text_bytes(key) + sum(text_bytes(segment) + 56 for segment in path)
    return TOMBSTONE_OVERHEAD + sum(text_bytes(segment) + 56 for segment in name)
