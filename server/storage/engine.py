"""NamespacedStorage: the operations of the store on the namespace tree."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from server.storage.expiry import ExpiryIndex
from server.storage.tree import Entry, NamespaceTree, Node

Clock = Callable[[], float]
NEVER = math.inf
"""Deadline (and `expires_in` answer) of an entry that does not expire."""


class NamespacedStorage:
    """In-memory key/value storage partitioned into hierarchical namespaces.

    Paths are sequences of namespace segments from the root. Durations are in
    seconds on `clock`, a monotonic clock (injectable for tests). An entry is
    gone for every operation from its deadline on; `reap` reclaims expired
    entries that nobody reads. Not thread-safe: call it from one thread (the
    server's event loop).
    """

    __slots__ = ("_clock", "_expiry", "_tree")

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._tree = NamespaceTree()
        self._expiry = ExpiryIndex(self._is_live)

    def set(self, path: Sequence[str], key: str, value: bytes, ttl: float | None = None) -> None:
        """Store `value` under `key`, replacing any previous value and expiry; `ttl` None: never expires."""
        node = self._tree.find_or_create(path)
        if ttl is None:
            node.entries[key] = Entry(value, NEVER, NEVER)
            return
        deadline = self._clock() + ttl
        entry = node.entries.get(key)
        if entry is not None and entry.scheduled <= deadline:
            # Its index item comes due first and reschedules it: no new item needed.
            entry.value = value
            entry.deadline = deadline
        else:
            node.entries[key] = Entry(value, deadline, deadline)
            self._expiry.add(deadline, node, key)

    def get(self, path: Sequence[str], key: str, renew_for: float | None = None) -> bytes | None:
        """The value of `key`, or None. With `renew_for`, an entry with a deadline gets now + renew_for."""
        found = self._find_live(path, key)
        if found is None:
            return None
        node, entry = found
        if renew_for is not None and entry.deadline != NEVER:
            entry.deadline = self._clock() + renew_for
            if entry.deadline < entry.scheduled:
                entry.scheduled = entry.deadline
                self._expiry.add(entry.deadline, node, key)
        return entry.value

    def delete(self, path: Sequence[str], key: str) -> None:
        """Remove `key`; a missing key is a no-op."""
        node = self._tree.find(path)
        if node is not None and node.entries.pop(key, None) is not None:
            self._tree.prune(node)

    def delete_all(self, path: Sequence[str] = ()) -> None:
        """Remove every entry at `path` and below; O(depth), whatever the number of keys."""
        self._tree.drop(path)

    def exists(self, path: Sequence[str], key: str) -> bool:
        """Whether `key` holds an unexpired value."""
        return self._find_live(path, key) is not None

    def expires_in(self, path: Sequence[str], key: str) -> float | None:
        """Seconds `key` has left: None if missing, `NEVER` if it has no expiry."""
        found = self._find_live(path, key)
        if found is None:
            return None
        deadline = found[1].deadline
        return NEVER if deadline == NEVER else deadline - self._clock()

    def reap(self, limit: int = 10_000) -> int:
        """Reclaim entries whose deadline has passed, looking at most at `limit` index items.

        Returns how many index items were looked at: `limit` means more may be due.
        """
        now = self._clock()
        due = self._expiry.pop_due(now, limit)
        for scheduled, node, key in due:
            entry = node.entries.get(key)
            if entry is None or entry.scheduled != scheduled:
                continue  # stale: the entry was deleted, replaced or rescheduled earlier
            if entry.deadline <= now:
                del node.entries[key]
                self._tree.prune(node)
            elif node.is_attached_to(self._tree.root):  # renewed since: look again at the new deadline
                entry.scheduled = entry.deadline
                self._expiry.add(entry.deadline, node, key)
        return len(due)

    def count(self, path: Sequence[str] = ()) -> int:
        """Entries held at `path` and below, including expired ones not yet reaped (walks the subtree)."""
        return self._tree.count(path)

    def index_size(self) -> int:
        """Items in the expiry index, stale ones included."""
        return len(self._expiry)

    def _find_live(self, path: Sequence[str], key: str) -> tuple[Node, Entry] | None:
        node = self._tree.find(path)
        if node is None:
            return None
        entry = node.entries.get(key)
        if entry is None:
            return None
        if entry.deadline <= self._clock():
            del node.entries[key]
            self._tree.prune(node)
            return None
        return node, entry

    def _is_live(self, scheduled: float, node: Node, key: str) -> bool:
        entry = node.entries.get(key)
        return entry is not None and entry.scheduled == scheduled and node.is_attached_to(self._tree.root)
