"""Tombstones: what was deleted, and when, kept while an older copy may still arrive.

A delete (or an expiry) leaves a tombstone for its key with the version of
the change; a `delete_all` leaves one for its namespace. A copy that arrives
later (a hand-off, an answer of a previous owner, a log replayed) is dropped
if a tombstone over it is as new as it or newer: at equal versions the
delete wins, as Cassandra's tombstones do.

They are bounded three ways, oldest first: by age (`age` seconds after the
change, by the version's clock), by count (`limit`), and by memory, since
their bytes count in the storage's `used_memory` and the storage drops the
oldest before it evicts an entry or refuses a write. A tombstone dropped
before its age is counted in `dropped_early`. After a tombstone is gone, an
older copy of its key that arrives is taken as news: a node that was away
for longer than the age may bring deleted keys back (the server refuses to
start such a node's data directory in a cluster: see Persistence.away).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nestkv.server.storage.clock import milliseconds_of
from nestkv.server.storage.tree import text_bytes

TOMBSTONE_OVERHEAD = 260
"""Bytes a key's tombstone costs beyond its key and namespace names: its dict slot, the
(path, key) tuple, the path tuple and the 16-byte version object (estimated for CPython 3.11)."""


class Tombstones:
    """Deleted keys and emptied namespaces with the version of the change, oldest first."""

    __slots__ = ("age", "bytes", "dropped_early", "keys", "limit", "subtrees")

    def __init__(self, age: float, limit: int) -> None:
        self.age = age
        self.limit = limit
        self.keys: dict[tuple[tuple[str, ...], str], bytes] = {}
        self.subtrees: dict[tuple[str, ...], bytes] = {}
        self.bytes = 0
        """Bytes the tombstones are accounted (part of NamespacedStorage.used_memory)."""
        self.dropped_early = 0
        """Tombstones dropped before their age: for room, or over the count."""

    def __len__(self) -> int:
        return len(self.keys) + len(self.subtrees)

    def over(self, path: Sequence[str], key: str) -> bytes | None:
        """The newest version that deleted `key` at `path`: its own tombstone or a namespace's above it."""
        newest = self.keys.get((tuple(path), key)) if self.keys else None
        if self.subtrees:
            for depth in range(len(path) + 1):
                version = self.subtrees.get(tuple(path[:depth]))
                if version is not None and (newest is None or version > newest):
                    newest = version
        return newest

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

    def collect(self, now: float) -> int:
        """Drop the tombstones older than `age` at wall-clock time `now` (seconds); how many."""
        horizon = int((now - self.age) * 1000)
        dropped = 0
        for table in (self.keys, self.subtrees):
            # In (about) the order of the changes: the first young one ends the table's turn.
            while table and milliseconds_of(next(iter(table.values()))) <= horizon:
                self._drop_first(table)
                dropped += 1
        return dropped

    def drop_oldest(self) -> bool:
        """Drop one tombstone before its age (to make room); False if there are none."""
        table = self.keys or self.subtrees
        if not table:
            return False
        self._drop_first(table)
        self.dropped_early += 1
        return True

    def _keep(self, table: dict[Any, bytes], name: Any, version: bytes) -> None:
        old = table.pop(name, None)
        if old is None:
            self.bytes += _size(name)
        elif old > version:
            version = old
        table[name] = version  # to the end: the order is that of the last change
        while len(self) > self.limit:
            self.drop_oldest()

    def _drop_first(self, table: dict[Any, bytes]) -> None:
        name = next(iter(table))
        del table[name]
        self.bytes -= _size(name)


def _size(name: tuple[tuple[str, ...], str] | tuple[str, ...]) -> int:
    """Bytes a tombstone of `name` ((path, key) or a namespace's path) is accounted."""
    if len(name) == 2 and isinstance(name[0], tuple):
        path, key = name
        return TOMBSTONE_OVERHEAD + text_bytes(key) + sum(text_bytes(segment) + 56 for segment in path)
    return TOMBSTONE_OVERHEAD + sum(text_bytes(segment) + 56 for segment in name)
