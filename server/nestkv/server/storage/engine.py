"""NamespacedStorage: the operations of the store on the namespace tree."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple, Protocol

from nestkv.server.errors import FailedPrecondition, IntegerOverflow, QuotaExceeded, StoreFull
from nestkv.server.storage.clock import HybridClock
from nestkv.server.storage.expiry import ExpiryWheel, listing_cost, relists, slot_of
from nestkv.server.storage.scan import ScanIndexes, Scanner, ScanPage
from nestkv.server.storage.tombstones import Tombstones
from nestkv.server.storage.tree import (
    TRAILER_BYTES,
    NamespaceTree,
    Node,
    deadline_of,
    grow,
    pack,
    text_bytes,
    value_of,
    version_of,
)

Clock = Callable[[], float]
NEVER = math.inf
"""Deadline (and `expires_in` answer) of an entry that does not expire."""


class Journal(Protocol):
    """Where the storage reports its changes (persistence), each with its version; deadlines are
    on the storage clock. Replayed in order through `merge`, they give the storage back."""

    def set(self, path: Sequence[str], key: str, value: bytes, deadline: float, version: bytes) -> None: ...

    def renew(self, path: Sequence[str], key: str, deadline: float, version: bytes) -> None: ...

    def delete(self, path: Sequence[str], key: str, version: bytes) -> None: ...

    def delete_all(self, path: Sequence[str], version: bytes) -> None: ...

    def drop(self, path: Sequence[str], key: str, version: bytes) -> None:
        """The copy of `key` at `version` left this node (handed off, evicted): not a delete."""


Condition = Literal["absent", "present", "version"]
"""When `set_if` stores: the key holds no live value, holds one, or holds one of a given version."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MAX_INTEGER_BYTES = 20  # "-9223372036854775808"


def _integer(value: bytes) -> int:
    """The integer a counter's value holds as ASCII decimal ("-?[0-9]+"); FailedPrecondition if none."""
    digits = value[1:] if value[:1] == b"-" else value
    if 0 < len(value) <= _MAX_INTEGER_BYTES and digits.isdigit() and digits.isascii():
        number = int(value)
        if INT64_MIN <= number <= INT64_MAX:
            return number
    raise FailedPrecondition(
        "increment of a value that is not an integer: it must be ASCII decimal (-?[0-9]+, "
        f"at most {_MAX_INTEGER_BYTES} characters) within the signed 64-bit range, as increment stores it"
    )


EvictionPolicy = Literal["noeviction", "allkeys-lru", "volatile-lru", "volatile-ttl"]

ENTRY_OVERHEAD = 132
"""Bytes an entry costs beyond its key and value: the objects' headers and its dict slot (its
expiry listing, if it has a deadline, is counted by storage.expiry).

Calibrated on CPython 3.11 with 1M entries (make bench: ~267 B of RSS per
entry with a 21-byte key and a 100-byte value)."""


_MAX_PASSED = 4096  # entries volatile-lru may pass over in one namespace to find one with a deadline


class SubtreeStats(NamedTuple):
    """Figures of a namespace and everything below it (see `NamespacedStorage.subtree`)."""

    keys: int
    bytes: int
    expiring_keys: int
    child_namespaces: int


def entry_size(key: str, stored: bytes) -> int:
    return text_bytes(key) + len(stored) + ENTRY_OVERHEAD


class NamespacedStorage:
    """In-memory key/value storage partitioned into hierarchical namespaces.

    Paths are sequences of namespace segments from the root. Durations are in
    seconds on `clock`, a monotonic clock (injectable for tests). An entry is
    gone for every operation from its deadline on; `reap` reclaims expired
    entries that nobody reads, and frees namespaces dropped by `delete_all`.
    Not thread-safe: call it from one thread (the server's event loop).

    Every change here is stamped with a version by `versions` (storage.clock);
    a copy of a change made elsewhere comes in through `merge`, and is kept
    only if it is newer than what is here. With `tombstones` (a cluster node,
    where copies meet), deletes, expiries and `delete_all` are remembered for a
    while, so that an older copy arriving later does not bring a key back.
    """

    __slots__ = (
        "_clock",
        "_dropped",
        "_evictions",
        "_expired",
        "_lru",
        "_max_memory",
        "_policy",
        "_quotas",
        "_sample",
        "_scans",
        "_tree",
        "_wheel",
        "journal",
        "tombstones",
        "versions",
    )

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        max_memory: int = 0,
        eviction_policy: EvictionPolicy = "noeviction",
        versions: HybridClock | None = None,
        tombstones: Tombstones | None = None,
    ) -> None:
        self.versions = versions or HybridClock()
        """Stamps the version of each change made here."""
        self.tombstones = tombstones
        """What was deleted, while an older copy may still arrive; None: nothing is remembered
        (a single server: no copies ever meet)."""
        self.journal: Journal | None = None
        """Told of every mutation once set (persistence attaches it after recovery)."""
        self._quotas: dict[tuple[str, ...], int] = {}
        self._max_memory = max_memory  # 0: unbounded
        self._policy = eviction_policy
        self._lru = eviction_policy in ("allkeys-lru", "volatile-lru")
        self._evictions = 0
        self._expired = 0
        self._sample: tuple[list[Node], list[int]] = ([], [])
        self._clock = clock
        self._tree = NamespaceTree()
        self._wheel = ExpiryWheel()
        self._scans = ScanIndexes()
        self._dropped: list[Node] = []  # detached by delete_all, freed by reap a chunk at a time

    def now(self) -> float:
        """The storage clock's reading."""
        return self._clock()

    @property
    def quotas(self) -> dict[tuple[str, ...], int]:
        """Byte quotas by namespace: a write or a delete may not take the namespace's subtree over
        its quota (its entries and tombstones, counted as `used_memory` is). Set by the server
        from the tokens' `max_bytes`; copies made elsewhere are never refused for it."""
        return self._quotas

    @quotas.setter
    def quotas(self, quotas: dict[tuple[str, ...], int]) -> None:
        self._quotas = quotas
        if self.tombstones is not None:
            self.tombstones.count_under(quotas)

    @property
    def used_memory(self) -> int:
        """Bytes the entries take, by `entry_size`, with the namespaces that hold them
        (`namespace_size`) and their expiry listings: what `max_memory` bounds.

        Namespaces dropped by `delete_all` stop counting at once, while `reap`
        frees them in the background, so no write pays for an earlier delete_all.
        """
        tombstones = self.tombstones
        return self._tree.root.subtree_bytes + (0 if tombstones is None else tombstones.bytes)

    def set(self, path: Sequence[str], key: str, value: bytes, ttl: float | None = None) -> bytes:
        """Store `value` under `key`, replacing any previous value and expiry; `ttl` None: never
        expires. The new value's version."""
        return self._write(path, key, value, NEVER if ttl is None else self._clock() + ttl)

    def set_if(
        self,
        path: Sequence[str],
        key: str,
        value: bytes,
        ttl: float | None,
        condition: Condition,
        version: bytes = b"",
    ) -> bytes | None:
        """`set`, only if the key holds no live value ("absent"), holds one ("present"), or holds
        one of `version` ("version"): checked and stored in one step. The new version, or None
        if the condition does not hold (nothing changed)."""
        stored = self._live(path, key)
        if condition == "absent":
            holds = stored is None
        elif condition == "present":
            holds = stored is not None
        else:
            holds = stored is not None and version_of(stored) == version
        return self.set(path, key, value, ttl) if holds else None

    def increment(
        self, path: Sequence[str], key: str, amount: int, ttl: float | None = None
    ) -> tuple[int, bytes, float]:
        """Add `amount` to the integer stored under `key` as ASCII decimal, in one step; a key with
        no live value is created holding `amount`, expiring after `ttl` (None: never); an existing
        one keeps its deadline. The new value, its version and its deadline (`NEVER`: none).
        Raises FailedPrecondition, changing nothing, if the value is not such an integer or the
        result leaves the signed 64-bit range."""
        stored = self._live(path, key)
        if stored is None:
            total, deadline = amount, NEVER if ttl is None else self._clock() + ttl
        else:
            total, deadline = _integer(value_of(stored)) + amount, deadline_of(stored)
            if not amount:  # a read: no new version, nothing to store, journal or replicate
                return total, version_of(stored), deadline
        if not INT64_MIN <= total <= INT64_MAX:
            # Not the sum: with the amount, it would tell the stored value to a reader of errors.
            raise IntegerOverflow(
                f"increment would take the value outside the signed 64-bit range [{INT64_MIN}, {INT64_MAX}]"
            )
        return total, self._write(path, key, b"%d" % total, deadline), deadline

    def delete_if(
        self, path: Sequence[str], key: str, *, version: bytes | None = None, value: bytes | None = None
    ) -> bool:
        """`delete`, only if the key holds a live value of `version`, or equal to `value` (one of
        the two is given): checked and removed in one step. Whether it was removed."""
        stored = self._live(path, key)
        if stored is None:
            return False
        matches = version_of(stored) == version if version is not None else value_of(stored) == value
        if not matches:
            return False
        self.delete(path, key)  # live when looked at: removed, whatever the clock says by now
        return True

    def _write(self, path: Sequence[str], key: str, value: bytes, deadline: float) -> bytes:
        """Store an entry with an absolute `deadline` as a write of this node: room made, stamped
        with a new version (returned), journaled."""
        if self._max_memory or self._quotas:
            self._reserve(path, key, self._needed(path, key, len(value), deadline))
        version = self.versions.now()
        self._put(path, key, value, deadline, version)
        if self.journal is not None:
            self.journal.set(path, key, value, deadline, version)
        return version

    def _live(self, path: Sequence[str], key: str) -> bytes | None:
        """The stored entry of `key` if it holds a live value (one past its deadline is expired
        now), else None."""
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if node is None or stored is None:
            return None
        if deadline_of(stored) <= self._clock():
            self._expire(node, key)
            return None
        return stored

    def _put(self, path: Sequence[str], key: str, value: bytes, deadline: float, version: bytes) -> None:
        """Store an entry with an absolute deadline on the storage clock (`NEVER`: none); not journaled."""
        tombstones = self.tombstones
        if tombstones is not None and tombstones.keys:
            tombstones.forget(path, key)
        node = self._tree.find_or_create(path)
        entries = node.entries
        old = entries.pop(key, None) if self._lru else entries.get(key)  # LRU: to the end of the order
        old_deadline = NEVER if old is None else deadline_of(old)
        stored = entries[key] = pack(value, version, deadline)
        if old is None and node.scan is not None:
            node.scan.key_added(key)
        expiring = (deadline != NEVER) - (old_deadline != NEVER)
        node.expiring += expiring
        size = entry_size(key, stored) - (0 if old is None else entry_size(key, old))
        grow(node, size, old is None, expiring)
        if relists(old_deadline, deadline):
            self._schedule(node, key, deadline)
        # Otherwise the key has no deadline, or is listed in its new deadline's slot already.

    def merge(
        self,
        path: Sequence[str],
        key: str,
        version: bytes,
        value: bytes | None = None,
        deadline: float = NEVER,
        *,
        make_room: bool = True,
    ) -> bool:
        """Take in a change made elsewhere (or earlier, from the log): `value` with `deadline` (on
        the storage clock, even if passed), or a delete if `value` is None. Whether it changed
        anything here.

        Last writer wins: a value is stored only if it is newer than the entry and every
        tombstone over its key; a delete removes an entry as old as it or older (at equal
        versions the delete wins) and leaves a tombstone. Commutative, associative and
        idempotent, so copies that meet in any order, any number of times, end the same.
        A copy is never refused for a limit: it was admitted where the change was made, and a
        copy that refused it would stay behind for ever. `make_room`: under max_memory, a value
        first evicts what the policy lets go; if that is not enough, it is kept all the same,
        and used_memory stays over max_memory until deletes, expiries or evictions bring it back
        (`over_memory` tells by how much). Quotas are not checked.
        """
        self.versions.observe(version)
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        tombstones = self.tombstones
        if value is None:
            removed = node is not None and stored is not None and version_of(stored) <= version
            if node is not None and removed:
                self._remove(node, key)
            if tombstones is not None:
                tombstones.bury(path, key, version)
            if self.journal is not None and (removed or tombstones is not None):
                self.journal.delete(path, key, version)  # a tombstone, even with nothing removed
            return removed
        if stored is not None and version_of(stored) >= version:
            return False
        if tombstones is not None:
            buried = tombstones.over(path, key)
            if buried is not None and buried >= version:
                return False
        if make_room and self._max_memory and (needed := self._needed(path, key, len(value), deadline)) > 0:
            self._evict_for(path, key, needed)  # and kept, even if that is not enough
        self._put(path, key, value, deadline, version)
        if self.journal is not None:
            self.journal.set(path, key, value, deadline, version)
        return True

    def merge_subtree(self, path: Sequence[str], version: bytes) -> int:
        """Take in a `delete_all` of the namespace at `path` made elsewhere (or earlier): every entry
        below it as old as it or older goes, and it leaves a tombstone. How many went."""
        self.versions.observe(version)
        tombstones = self.tombstones
        if tombstones is not None:
            buried = tombstones.of_subtree(path)
            if buried is not None and buried >= version:
                return 0  # taken in already: nothing below it is as old (the clock ran past it)
            tombstones.bury_subtree(path, version)
        removed = 0
        for _, node in list(self._tree.walk(path)):
            for key, stored in list(node.entries.items()):
                if version_of(stored) <= version:
                    self._discard(node, key)
                    removed += 1
            self._tree.prune(node)
        if self.journal is not None:
            self.journal.delete_all(path, version)
        return removed

    def discard(self, path: Sequence[str], key: str, version: bytes) -> None:
        """Take in a copy that left earlier (from the log, see Journal.drop): the entry goes if it
        is still that version; no tombstone, not journaled."""
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if node is not None and stored is not None and version_of(stored) == version:
            self._remove(node, key)

    def renew_until(self, path: Sequence[str], key: str, deadline: float, version: bytes) -> None:
        """Take in a renewal made earlier (from the log): an entry older than `version` that has a
        deadline gets `deadline` (even if it has passed: it was live when renewed); not journaled."""
        self.versions.observe(version)
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if stored is not None and deadline_of(stored) != NEVER and version_of(stored) < version:
            self._put(path, key, value_of(stored), deadline, version)

    def get(self, path: Sequence[str], key: str, renew_for: float | None = None) -> bytes | None:
        """The value of `key`, or None. With `renew_for`, an entry with a deadline gets now + renew_for."""
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        if node is None or stored is None:
            return None
        now = self._clock()
        deadline = deadline_of(stored)
        if deadline <= now:
            self._expire(node, key)
            return None
        value = value_of(stored)
        if self._lru:  # most recently used last
            del node.entries[key]
            node.entries[key] = stored
        if renew_for is not None and deadline != NEVER:
            renewed = now + renew_for
            moved = relists(deadline, renewed)
            if moved and (self._max_memory or self._quotas):  # a listing in another slot: room first
                self._reserve(path, key, listing_cost(node, deadline, renewed))
            version = self.versions.now()
            node.entries[key] = pack(value, version, renewed)
            if moved:
                self._schedule(node, key, renewed)
            if self.journal is not None:
                self.journal.renew(path, key, renewed, version)
        return value

    def get_entry(
        self, path: Sequence[str], key: str, renew_for: float | None = None
    ) -> tuple[bytes, bytes, float] | None:
        """`get`, with the entry's version and the seconds it has left (`NEVER`: no expiry)."""
        if self.get(path, key, renew_for) is None:
            return None
        node = self._tree.find(path)
        assert node is not None
        stored = node.entries[key]
        deadline = deadline_of(stored)
        left = NEVER if deadline == NEVER else max(deadline - self._clock(), 0.001)  # it was live
        return value_of(stored), version_of(stored), left

    def delete(self, path: Sequence[str], key: str) -> bool:
        """Remove `key`; a missing key is a no-op, but for its tombstone (with `tombstones`).
        Whether it held a live value."""
        node = self._tree.find(path)
        stored = None if node is None else node.entries.get(key)
        held = stored is not None
        live = stored is not None and deadline_of(stored) > self._clock()
        tombstones = self.tombstones
        if not held and tombstones is None:
            return False
        if not held and tombstones is not None:
            self._admit_tombstone(path, key)
        version = self.versions.now()
        if node is not None and held:
            self._remove(node, key)
        if tombstones is not None:
            tombstones.bury(path, key, version)
        if self.journal is not None:
            self.journal.delete(path, key, version)
        return live

    def delete_all(self, path: Sequence[str] = ()) -> None:
        """Remove every entry at `path` and below; O(depth), whatever the number of keys.

        The subtree is detached at once; `reap` frees its memory in chunks. Everything in it is
        older than the change (the clock is ahead of every version stored here).
        """
        if self.tombstones is not None and self._tree.find(path) is None:
            self._admit_tombstone(path, None)
        version = self.versions.now()
        dropped = self._tree.drop(path)
        if dropped is not None:
            self._dropped.append(dropped)
        if self.tombstones is not None:
            self.tombstones.bury_subtree(path, version)
        if self.journal is not None:
            self.journal.delete_all(path, version)

    def _admit_tombstone(self, path: Sequence[str], key: str | None) -> None:
        """Make sure the tombstone of a delete that removes nothing here (of `key`, or None: of the
        namespace at `path`) fits the tombstone limit, max_memory and the quotas over it, or raise
        StoreFull or QuotaExceeded: such a delete costs memory for tombstone_age and frees none."""
        tombstones = self.tombstones
        assert tombstones is not None
        needed = tombstones.size(path, key)
        if not needed:
            return  # its tombstone is here already: buried again in place
        what = "this delete removes nothing here" if key is not None else "this namespace holds nothing here"
        why = (
            f"{what}, and is remembered (a tombstone of {needed} B, kept {tombstones.age:g} s so that an "
            "older copy does not bring it back)"
        )
        if len(tombstones) >= tombstones.limit:
            raise StoreFull(
                f"this node holds {len(tombstones)} tombstones, its --max-tombstones; "
                "deletes of what is stored still work",
                needed,
                why,
            )
        try:
            self._reserve(path, key or "", needed)
        except QuotaExceeded as fault:
            raise QuotaExceeded(str(fault), why) from None
        except StoreFull as fault:
            raise StoreFull(str(fault), needed, why) from None

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
            self._expire(node, key)
            return None
        return left

    def reap(self, limit: int = 10_000) -> int:
        """Reclaim expired entries nobody reads and free dropped namespaces, doing at most `limit` steps.

        A step looks at one listing of the expiry wheel or frees one entry. Tombstones past their
        age are collected too. Returns the steps taken: `limit` means more work may be waiting.
        """
        if self.tombstones is not None:
            self.tombstones.collect()
        if self._scans.nodes:
            self._scans.drop_idle(self._tree.root, self._clock())
        steps = self._free_dropped(limit)
        now = self._clock()
        while steps < limit:
            listing = self._pop_due_listing(now)
            if listing is None:
                break
            steps += 1
            node, key = listing
            if key is not None:  # its deadline is within a slot that has ended: expired
                self._expire(node, key)
        return steps

    def _pop_due_listing(self, now: float) -> tuple[Node, str | None] | None:
        """Take one listing from the earliest slot of the wheel that has ended by `now` (inf: any slot).

        None when no slot is due. Otherwise `(node, key)` with the entry whose
        deadline falls in that slot, or `(node, None)` for a stale listing: the
        entry is gone or no longer expires, its namespace was dropped, or its
        deadline moved to a later slot, where it is listed again. Expiry and
        volatile-ttl eviction both take entries in deadline order through here.
        """
        due = self._wheel.next_due(now)
        if due is None:
            return None
        slot, node = due
        if not node.is_attached_to(self._tree.root):  # dropped: nothing of it is live or counted
            del node.slots[slot]
            return node, None
        key = self._wheel.take(node, slot)
        stored = node.entries.get(key)
        if stored is None:
            return node, None  # deleted since
        deadline = deadline_of(stored)
        if deadline == NEVER:
            return node, None
        if slot_of(deadline) != slot:  # its deadline changed since: it is listed in that one's slot
            return node, None
        return node, key

    def scan(
        self,
        path: Sequence[str],
        cursor: bytes = b"",
        limit: int = 1000,
        *,
        recursive: bool = False,
        values: bool = False,
    ) -> ScanPage | None:
        """A page of up to `limit` live keys of the namespace at `path` (`recursive`: and below,
        each with its path under `path`) after `cursor` (empty: from the start), with the cursor
        of the next page (empty when done); see storage.scan for the order and the guarantees.

        None: an index the page needs is being built, and one step of it was done; call again
        after letting others run. InvalidArgument for a cursor this scan did not give.
        """
        return Scanner(self._scans).page(
            self._tree.find(path), path, cursor, limit, self._clock(), recursive=recursive, values=values
        )

    @property
    def scan_indexes(self) -> ScanIndexes:
        """The scan indexes that exist now (what they hold: `held()`)."""
        return self._scans

    def namespaces(self) -> Iterator[tuple[tuple[str, ...], Node]]:
        """Each namespace that holds entries, with its path (walks the tree)."""
        return ((path, node) for path, node in self._tree.walk() if node.entries)

    def entries(self, node: Node) -> list[tuple[str, bytes]]:
        """The (key, stored form) pairs of a namespace from `namespaces()`, as they are now.

        tree.value_of, version_of and deadline_of read a stored form."""
        return list(node.entries.items())

    def time_left(self, stored: bytes) -> float | None:
        """Seconds a stored form has left: `NEVER` if it has no deadline, None if it has expired."""
        deadline = deadline_of(stored)
        if deadline == NEVER:
            return NEVER
        left = deadline - self._clock()
        return left if left > 0 else None

    def delete_unchanged(self, path: Sequence[str], key: str, stored: bytes) -> bool:
        """Remove `key` if it still holds `stored` (the very object `entries` gave); whether it did."""
        node = self._tree.find(path)
        if node is None or node.entries.get(key) is not stored:
            return False
        self._remove(node, key)
        if self.journal is not None:  # that copy only, and no tombstone: it lives on elsewhere
            self.journal.drop(path, key, version_of(stored))
        return True

    @property
    def keys(self) -> int:
        """Entries in the whole store, expired ones not yet reclaimed included; O(1)."""
        return self._tree.root.subtree_keys

    @property
    def evictions(self) -> int:
        """Entries evicted to make room, since the storage was made."""
        return self._evictions

    @property
    def expired(self) -> int:
        """Entries reclaimed because their deadline passed (by a read or by `reap`), since it was made."""
        return self._expired

    @property
    def max_memory(self) -> int:
        """The bound on `used_memory`; 0: none."""
        return self._max_memory

    def subtree(self, path: Sequence[str]) -> SubtreeStats:
        """Keys, bytes and expiring keys of the namespace at `path` and below, and its child namespaces.

        O(depth): the figures are kept per subtree as the store changes.
        """
        node = self._tree.find(path)
        if node is None:
            return SubtreeStats(0, 0, 0, 0)
        return SubtreeStats(node.subtree_keys, node.subtree_bytes, node.subtree_expiring, len(node.children))

    def quota_at(self, path: Sequence[str]) -> tuple[tuple[str, ...], int, int] | None:
        """(namespace, quota, bytes used) of the innermost namespace at or above `path` that has a
        quota; None: none."""
        return next(self._quotas_over(path), None)

    def count(self, path: Sequence[str] = ()) -> int:
        """Entries held at `path` and below, including expired ones not yet reaped; O(depth)."""
        return self.subtree(path).keys

    def index_size(self) -> int:
        """Keys listed in the expiry wheel, stale listings included (walks the tree)."""
        return sum(node.scheduled for _, node in self._tree.walk())

    def _schedule(self, node: Node, key: str, deadline: float) -> None:
        self._wheel.schedule(node, key, deadline)
        if self._wheel.needs_rebuild(node):
            self._wheel.rebuild(node)

    def _expire(self, node: Node, key: str) -> None:
        if self.tombstones is not None:  # an older copy, with a later deadline, must not come back
            self.tombstones.bury(_path_of(node), key, version_of(node.entries[key]))
        self._remove(node, key)
        self._expired += 1

    def _remove(self, node: Node, key: str) -> None:
        self._discard(node, key)
        self._tree.prune(node)

    def _discard(self, node: Node, key: str) -> None:
        """Take an entry out with its accounting; the caller prunes the node when it is done with it."""
        stored = node.entries.pop(key)
        expiring = deadline_of(stored) != NEVER
        node.expiring -= expiring
        grow(node, -entry_size(key, stored), -1, -expiring)

    def _needed(self, path: Sequence[str], key: str, value_bytes: int, deadline: float) -> int:
        """The bytes a write of a `value_bytes` value under `key` would add (less if it replaces a
        larger entry): the entry, the namespaces it creates and, with a `deadline`, its listing in
        the expiry wheel (with the slot's list if the namespace has none yet)."""
        node = self._tree.find(path)
        old = None if node is None else node.entries.get(key)
        needed = text_bytes(key) + value_bytes + TRAILER_BYTES + ENTRY_OVERHEAD
        needed += self._tree.creation_size(path)
        needed += listing_cost(node, NEVER if old is None else deadline_of(old), deadline)
        if old is not None:
            needed -= entry_size(key, old)
        return needed

    def _reserve(self, path: Sequence[str], key: str, needed: int) -> None:
        """Make sure `needed` more bytes for a write of `key` at `path` fit its namespaces' quotas and
        max_memory (evicting by the policy), or raise QuotaExceeded or StoreFull: every path that
        makes the store take more memory comes through here first."""
        if self._quotas:
            self._check_quotas(path, needed)
        if self._max_memory:
            self._make_room(path, key, needed)

    def _check_quotas(self, path: Sequence[str], needed: int) -> None:
        """Raise QuotaExceeded if `needed` more bytes at `path` would take a namespace with a quota,
        at `path` or above it, over that quota."""
        if needed <= 0:
            return
        for namespace, quota, used in self._quotas_over(path):
            if used + needed > quota:
                raise QuotaExceeded(
                    f"namespace {list(namespace)} holds {used} B and this write needs {needed} B more: "
                    f"over its quota of {quota} B (its token's max_bytes); delete keys in it to make room"
                )

    def _quotas_over(self, path: Sequence[str]) -> Iterator[tuple[tuple[str, ...], int, int]]:
        """(namespace, quota, bytes used) of each namespace at or above `path` that has a quota,
        the innermost first."""
        tombstones = self.tombstones
        for depth in range(len(path), -1, -1):
            namespace = tuple(path[:depth])
            quota = self._quotas.get(namespace)
            if quota is not None:
                used = self.subtree(namespace).bytes
                if tombstones is not None:
                    used += tombstones.bytes_under(namespace)
                yield namespace, quota, used

    def _make_room(self, path: Sequence[str], key: str, needed: int) -> None:
        """Evict by the policy until `needed` more bytes for a write of `key` at `path` fit, or raise
        StoreFull."""
        if needed > self._max_memory:
            raise StoreFull(f"this write needs {needed} B; max_memory is {self._max_memory} B in all", needed)
        if not self._evict_for(path, key, needed):
            raise StoreFull(
                f"used memory {self.used_memory} B + {needed} B for this write would exceed "
                f"max_memory {self._max_memory} B, and eviction policy {self._policy} frees nothing; "
                "reads and deletes still work",
                needed,
            )

    def _evict_for(self, path: Sequence[str], key: str, needed: int) -> bool:
        """Evict by the policy until `needed` more bytes for a write of `key` at `path` fit
        max_memory; whether they do (the policy may let nothing go)."""
        while self.used_memory + needed > self._max_memory:
            if self._policy == "noeviction" or not self._evict_one(path, key):
                return False
        return True

    @property
    def over_memory(self) -> int:
        """Bytes `used_memory` is over max_memory (copies kept when nothing could be evicted); 0
        within it."""
        return max(self.used_memory - self._max_memory, 0) if self._max_memory else 0

    def _evict_one(self, path: Sequence[str], key: str) -> bool:
        """Remove one entry chosen by the policy (never `key` at `path`); False if none may go."""
        if self._policy == "volatile-ttl":
            return self._evict_soonest_deadline(path, key)
        volatile = self._policy == "volatile-lru"
        for _ in range(8):
            node = self._pick_namespace(volatile)
            if node is None:
                return False
            entries = node.entries
            passed = 0
            while passed < _MAX_PASSED and (batch := list(itertools.islice(entries, 64))):
                for candidate in batch:  # least recently used first
                    if (volatile and deadline_of(entries[candidate]) == NEVER) or (
                        candidate == key and _same(node, path)
                    ):
                        # Not evictable: to the back. Its recency does not matter to this policy
                        # (or it is being written, which makes it the most recent anyway).
                        entries[candidate] = entries.pop(candidate)
                        passed += 1
                        continue
                    self._evict(node, candidate)
                    return True
        return False

    def _evict_soonest_deadline(self, path: Sequence[str], key: str) -> bool:
        """volatile-ttl: the entry whose deadline comes first, found through the expiry wheel."""
        writing: Node | None = None  # the namespace of `key` if its listing was taken: listed again below
        try:
            while (listing := self._pop_due_listing(math.inf)) is not None:
                node, candidate = listing
                if candidate is None:
                    continue
                if candidate == key and _same(node, path):
                    writing = node
                    continue
                self._evict(node, candidate)
                return True
            return False
        finally:
            if writing is not None:
                self._wheel.schedule(writing, key, deadline_of(writing.entries[key]))

    def _evict(self, node: Node, key: str) -> None:
        version = version_of(node.entries[key])
        self._remove(node, key)
        self._evictions += 1
        if self.journal is not None:  # or a restart would bring it back (as a drop: no tombstone)
            self.journal.drop(_path_of(node), key, version)

    def _pick_namespace(self, volatile: bool) -> Node | None:
        """A namespace with entries (`volatile`: with deadlines), at random in proportion to their number.

        The weights are refreshed every 256 evictions, or when a pick finds its namespace gone.
        """
        for fresh in (False, True):
            nodes, weights = self._sample
            if fresh or not nodes or self._evictions % 256 == 0:
                pairs = [(n, n.expiring if volatile else len(n.entries)) for _, n in self.namespaces()]
                pairs = [(n, weight) for n, weight in pairs if weight]
                nodes, weights = self._sample = [n for n, _ in pairs], [w for _, w in pairs]
            if not nodes:
                return None
            node = random.choices(nodes, weights)[0]
            if (node.expiring if volatile else node.entries) and node.is_attached_to(self._tree.root):
                return node
        return None

    def _free_dropped(self, limit: int) -> int:
        """Free up to about `limit` entries of dropped namespaces; return how many steps that took."""
        steps = 0
        dropped = self._dropped
        while dropped and steps < limit:
            node = dropped[-1]
            if node.entries:
                entries = node.entries
                chunk = min(len(entries), limit - steps)
                for _ in range(chunk):
                    entries.popitem()  # no longer counted in used_memory since it was dropped
                steps += chunk
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


def _path_of(node: Node) -> tuple[str, ...]:
    names = []
    while node.parent is not None:
        names.append(node.name)
        node = node.parent
    return tuple(reversed(names))


def _same(node: Node, path: Sequence[str]) -> bool:
    return _path_of(node) == tuple(path)
