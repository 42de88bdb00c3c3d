"""NamespacedStorage: the operations of the store on the namespace tree."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from server.storage.expiry import ExpiryWheel, slot_of
from server.storage.tree import NamespaceTree, Node, deadline_of, pack, value_of

Clock = Callable[[], float]
NEVER = math.inf
"""Deadline (and `expires_in` answer) of an entry that does not expire."""


class Journal(Protocol):
    """Where the storage reports its mutations (persistence); deadlines are on the storage clock."""

    def set(self, path: Sequence[str], key: str, value: bytes, deadline: float) -> None: ...

    def renew(self, path: Sequence[str], key: str, deadline: float) -> None: ...

    def delete(self, path: Sequence[str], key: str) -> None: ...

    def delete_all(self, path: Sequence[str]) -> None: ...


class NamespacedStorage:
    """In-memory key/value storage partitioned into hierarchical namespaces.

    Paths are sequences of namespace segments from the root. Durations are in
    seconds on `clock`, a monotonic clock (injectable for tests). An entry is
    gone for every operation from its deadline on; `reap` reclaims expired
    entries that nobody reads, and frees namespaces dropped by `delete_all`.
    Not thread-safe: call it from one thread (the server's event loop).
    """

    __slots__ = ("_clock", "_dropped", "_tree", "_wheel", "journal")

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.journal: Journal | None = None
        """Told of every mutation once set (persistence attaches it after recovery)."""
        self._clock = clock
        self._tree = NamespaceTree()
        self._wheel = ExpiryWheel()
        self._dropped: list[Node] = []  # detached by delete_all, freed by reap a chunk at a time

    def now(self) -> float:
        """The storage clock's reading."""
        return self._clock()

    def set(self, path: Sequence[str], key: str, value: bytes, ttl: float | None = None) -> None:
        """Store `value` under `key`, replacing any previous value and expiry; `ttl` None: never expires."""
        deadline = NEVER if ttl is None else self._clock() + ttl
        self.put(path, key, value, deadline)
        if self.journal is not None:
            self.journal.set(path, key, value, deadline)

    def put(self, path: Sequence[str], key: str, value: bytes, deadline: float) -> None:
        """`set` with an absolute deadline on the storage clock (`NEVER`: none); not journaled."""
        node = self._tree.find_or_create(path)
        old = node.entries.get(key)
        old_deadline = NEVER if old is None else deadline_of(old)
        node.entries[key] = pack(value, deadline)
        if deadline == NEVER:
            if old_deadline != NEVER:
                node.expiring -= 1
        elif old_deadline == NEVER:
            node.expiring += 1
            self._schedule(node, key, deadline)
        elif slot_of(deadline) < slot_of(old_deadline):
            self._schedule(node, key, deadline)
        # Otherwise the key is listed no later than its new deadline already.

    def renew_until(self, path: Sequence[str], key: str, deadline: float) -> None:
        """Give an entry that has a deadline the new `deadline`, even if it has passed; not journaled.

        For replaying a log, where the entry was live when it was renewed.
        """
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if stored is not None and deadline_of(stored) != NEVER:
            self.put(path, key, value_of(stored), deadline)

    def get(self, path: Sequence[str], key: str, renew_for: float | None = None) -> bytes | None:
        """The value of `key`, or None. With `renew_for`, an entry with a deadline gets now + renew_for."""
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if node is None or stored is None:
            return None
        now = self._clock()
        deadline = deadline_of(stored)
        if deadline <= now:
            self._remove(node, key)
            return None
        value = value_of(stored)
        if renew_for is not None and deadline != NEVER:
            renewed = now + renew_for
            node.entries[key] = pack(value, renewed)
            if slot_of(renewed) < slot_of(deadline):
                self._schedule(node, key, renewed)
            if self.journal is not None:
                self.journal.renew(path, key, renewed)
        return value

    def delete(self, path: Sequence[str], key: str) -> None:
        """Remove `key`; a missing key is a no-op."""
        node = self._tree.find(path)
        if node is not None and key in node.entries:
            self._remove(node, key)
            if self.journal is not None:
                self.journal.delete(path, key)

    def delete_all(self, path: Sequence[str] = ()) -> None:
        """Remove every entry at `path` and below; O(depth), whatever the number of keys.

        The subtree is detached at once; `reap` frees its memory in chunks.
        """
        dropped = self._tree.drop(path)
        if dropped is not None:
            self._dropped.append(dropped)
        if self.journal is not None:
            self.journal.delete_all(path)

    def exists(self, path: Sequence[str], key: str) -> bool:
        """Whether `key` holds an unexpired value."""
        return self.expires_in(path, key) is not None

    def expires_in(self, path: Sequence[str], key: str) -> float | None:
        """Seconds `key` has left: None if missing, `NEVER` if it has no expiry."""
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if node is None or stored is None:
            return None
        deadline = deadline_of(stored)
        if deadline == NEVER:
            return NEVER
        left = deadline - self._clock()
        if left <= 0:
            self._remove(node, key)
            return None
        return left

    def reap(self, limit: int = 10_000) -> int:
        """Reclaim expired entries nobody reads and free dropped namespaces, doing at most `limit` steps.

        A step looks at one listing of the expiry wheel or frees one entry.
        Returns the steps taken: `limit` means more work may be waiting.
        """
        steps = self._free_dropped(limit)
        now = self._clock()
        root = self._tree.root
        while steps < limit:
            due = self._wheel.next_due(now)
            if due is None:
                break
            slot, node = due
            keys = node.slots[slot]
            if not node.is_attached_to(root):  # dropped or pruned: nothing of it is live
                del node.slots[slot]
                steps += 1
                continue
            entries = node.entries
            while keys and steps < limit:
                key = keys.pop()
                node.scheduled -= 1
                steps += 1
                stored = entries.get(key)
                if stored is None:
                    continue  # deleted since
                deadline = deadline_of(stored)
                if deadline <= now:
                    del entries[key]
                    node.expiring -= 1
                elif deadline != NEVER and slot_of(deadline) > slot:  # pushed out: list it in its slot
                    self._wheel.schedule(node, key, deadline)
            if not keys:
                del node.slots[slot]
                self._tree.prune(node)
        return steps

    def namespaces(self) -> Iterator[tuple[tuple[str, ...], Node]]:
        """Each namespace that holds entries, with its path (walks the tree)."""
        stack: list[tuple[tuple[str, ...], Node]] = [((), self._tree.root)]
        while stack:
            path, node = stack.pop()
            if node.entries:
                yield path, node
            stack.extend(((*path, name), child) for name, child in node.children.items())

    def count(self, path: Sequence[str] = ()) -> int:
        """Entries held at `path` and below, including expired ones not yet reaped (walks the subtree)."""
        return sum(len(node.entries) for node in self._tree.nodes(path))

    def index_size(self) -> int:
        """Keys listed in the expiry wheel, stale listings included (walks the tree)."""
        return sum(node.scheduled for node in self._tree.nodes())

    def _schedule(self, node: Node, key: str, deadline: float) -> None:
        self._wheel.schedule(node, key, deadline)
        if self._wheel.needs_rebuild(node):
            self._wheel.rebuild(node)

    def _remove(self, node: Node, key: str) -> None:
        if deadline_of(node.entries.pop(key)) != NEVER:
            node.expiring -= 1
        self._tree.prune(node)

    def _free_dropped(self, limit: int) -> int:
        """Free up to about `limit` entries of dropped namespaces; return how many steps that took."""
        steps = 0
        dropped = self._dropped
        while dropped and steps < limit:
            node = dropped[-1]
            if node.entries:
                entries = node.entries
                for _ in range(min(len(entries), limit - steps)):
                    entries.popitem()
                    steps += 1
            elif node.slots:
                slot, keys = next(iter(node.slots.items()))
                chunk = min(len(keys), limit - steps)
                del keys[len(keys) - chunk :]
                steps += chunk
                if not keys:
                    del node.slots[slot]
            else:
                dropped.pop()
                dropped.extend(node.children.values())
                node.children = {}
                steps += 1
        return steps
