"""Tombstones: what was deleted, and when, kept while an older copy may still arrive.

A delete (or an expiry) leaves a tombstone for its key with the version of
the change; a `delete_all` leaves one for its namespace. A copy that arrives
later (a hand-off, an answer of a previous owner, a log replayed) is dropped
if a tombstone over it is as new as it or newer: at equal versions the
delete wins, as Cassandra's tombstones do.

A tombstone is only ever collected by age (`age` seconds after it was
buried here, by the wall clock: an expiry ages from the expiry, not from the
write), never earlier: a tombstone dropped while an older copy of its key may
still arrive would undo the delete. They are bounded where a delete enters
instead: their bytes count in the storage's `used_memory` and in the quota of
every namespace above them (`bytes_under`), and the storage refuses a delete
that removes nothing when its tombstone would not fit (`limit`, max_memory,
quotas), as it refuses a write. A delete that removes a value is always taken
(it frees about what its tombstone costs), and so is every copy of a delete
made elsewhere. After a tombstone is gone, an older copy of its key that
arrives is taken as news: a node that was away for longer than the age may
bring deleted keys back (the server refuses to start such a node's data
directory in a cluster: nestkv.server.app.open_persistence).

Each is kept as its version followed by the wall-clock millisecond it was
buried (8 bytes, big-endian): buried again, it goes to the end of its table
with the newer of the two versions, so each table is in the order of burial.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from nestkv.server.storage.clock import VERSION_BYTES
from nestkv.server.storage.tree import text_bytes

TOMBSTONE_OVERHEAD = 268
"""Bytes a key's tombstone costs beyond its key and namespace names: its dict slot, the
(path, key) tuple, the path tuple and the 24-byte version-and-time object (estimated for
CPython 3.11)."""


class Tombstones:
    """Deleted keys and emptied namespaces with the version of the change, oldest first."""

    __slots__ = ("_counted", "_under", "_wall", "age", "bytes", "keys", "limit", "subtrees")

    def __init__(self, age: float, limit: int, wall: Callable[[], float] = time.time) -> None:
        """`limit`: most tombstones a delete that removes nothing may take the count to (the
        storage checks it; copies from elsewhere are kept past it). `wall`: the wall clock, in
        Unix seconds (injectable for tests)."""
        self.age = age
        self.limit = limit
        self._wall = wall
        self.keys: dict[tuple[tuple[str, ...], str], bytes] = {}  # version + burial ms
        self.subtrees: dict[tuple[str, ...], bytes] = {}
        self.bytes = 0
        """Bytes the tombstones are accounted (part of NamespacedStorage.used_memory)."""
        self._counted: Collection[tuple[str, ...]] = ()  # the namespaces `_under` keeps figures of
        self._under: dict[tuple[str, ...], int] = {}  # their tombstones' bytes, below them included

    def count_under(self, namespaces: Collection[tuple[str, ...]]) -> None:
        """Keep the bytes of the tombstones below each of `namespaces` from now on (those with a
        quota: a container the caller keeps up to date, then calls this again); counts them now."""
        self._counted = namespaces
        self._under = {}
        for path, key in self.keys:
            self._count_under(path, _size(path, key))
        for path in self.subtrees:
            self._count_under(path, _size(path))

    def bytes_under(self, path: Sequence[str]) -> int:
        """Bytes of the tombstones at `path` and below it, if `path` is counted (see `count_under`)."""
        return self._under.get(tuple(path), 0) if path else self.bytes

    def size(self, path: Sequence[str], key: str | None = None) -> int:
        """Bytes a tombstone of `key` at `path` (None: of the namespace itself) would add now: 0 if
        there is one already."""
        name = tuple(path)
        if key is None:
            return 0 if name in self.subtrees else _size(name)
        return 0 if (name, key) in self.keys else _size(name, key)

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
        self._keep(tuple(path), key, version)

    def bury_subtree(self, path: Sequence[str], version: bytes) -> None:
        """Record that the namespace at `path` was emptied by the change `version`."""
        self._keep(tuple(path), None, version)

    def forget(self, path: Sequence[str], key: str) -> None:
        """A newer value of `key` was stored: its tombstone can no longer decide anything."""
        name = tuple(path)
        if self.keys.pop((name, key), None) is not None:
            self._count(name, -_size(name, key))

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

    def _keep(self, path: tuple[str, ...], key: str | None, version: bytes) -> None:
        """Bury `key` at `path` (None: the namespace at `path`) with `version`, or the newer one it has."""
        table: dict[Any, bytes] = self.subtrees if key is None else self.keys
        name = path if key is None else (path, key)
        old = table.pop(name, None)
        if old is None:
            self._count(path, _size(path, key))
        elif old[:VERSION_BYTES] > version:
            version = old[:VERSION_BYTES]
        # To the end, buried now: the order is that of burial.
        table[name] = version + int(self._wall() * 1000).to_bytes(8, "big")

    def _drop_first(self, table: dict[Any, bytes]) -> None:
        name = next(iter(table))
        del table[name]
        path, key = name if table is self.keys else (name, None)
        self._count(path, -_size(path, key))

    def _count(self, path: tuple[str, ...], size: int) -> None:
        """Add `size` to the bytes of the tombstones, and of those below each namespace counted
        above `path` (the tombstone's own, or its key's): the one place they change."""
        self.bytes += size
        if self._counted:
            self._count_under(path, size)

    def _count_under(self, path: tuple[str, ...], size: int) -> None:
        counted, under = self._counted, self._under
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            if prefix in counted:
                under[prefix] = under.get(prefix, 0) + size


def _buried_at(buried: bytes) -> int:
    return int.from_bytes(buried[VERSION_BYTES:], "big")


def _size(path: Sequence[str], key: str | None = None) -> int:
    """Bytes the tombstone of `key` at `path` (None: of the namespace at `path`) is accounted."""
    size = TOMBSTONE_OVERHEAD + sum(text_bytes(segment) + 56 for segment in path)
    return size if key is None else size + text_bytes(key)
