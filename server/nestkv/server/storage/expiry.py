"""The expiry wheel behind active expiry.

Time is cut into slots of 1/SLOTS_PER_SECOND s. Each namespace node lists,
per slot, the keys that may expire in it (`Node.slots`), and a min-heap holds
`(slot, seq, node)` once per list, so that the reaper finds the due lists in
order. A key costs one list item (8 bytes), not a heap item of its own.

Invariant: every entry with a deadline is listed in its deadline's slot. A
renewal or an overwrite that moves a deadline to another slot lists the key
there, at once; the listing left in the old slot is stale, and so are those
of deleted keys: skipped when their slot comes due. So listings are made only
by writes, which make room for them first (NamespacedStorage._reserve); the
reaper and a rebuild never add one. A node whose
listings outnumber twice its expiring entries (plus a floor) has its slots
rebuilt, which keeps them O(live entries) at O(1) amortized cost per listing.
The heap's entries for lists that are gone (finished, rebuilt, or of a pruned
namespace) are dropped when due, or all at once when they outnumber the live
lists (plus a floor), which keeps the heap O(live lists) as well.

Accounting: each listing and each list are added to their node's accounted
bytes (`tree.grow`) while they exist, so that expiry bookkeeping counts
against max_memory as entries do.
"""

from __future__ import annotations

import heapq
import itertools
import math

from nestkv.server.storage.tree import Node, deadline_of, grow

SLOTS_PER_SECOND = 10
_REBUILD_FLOOR = 64
_COMPACT_FLOOR = 1024

LISTING_BYTES = 8
"""Bytes a key's listing in a slot costs: its pointer in the slot's list."""
SLOT_OVERHEAD = 768
"""Bytes a node's list for one slot costs beyond its listings: the list, its place in the
node's `slots`, its heap entry, and a share of the heap entries and pruned nodes that stale
entries may keep alive until compacted (tracemalloc, as NAMESPACE_OVERHEAD)."""


def slot_of(deadline: float) -> int:
    """The slot whose end is the first at or after `deadline`."""
    return math.ceil(deadline * SLOTS_PER_SECOND)


def relists(old_deadline: float, deadline: float) -> bool:
    """Whether an entry whose deadline changes from `old_deadline` to `deadline` (inf: none) is
    listed again: it has one now, in another slot than before (or had none)."""
    return deadline != math.inf and (old_deadline == math.inf or slot_of(deadline) != slot_of(old_deadline))


def listing_cost(node: Node | None, old_deadline: float, deadline: float) -> int:
    """The bytes that listing an entry of `node` (None: not made yet) whose deadline changes from
    `old_deadline` to `deadline` adds: its listing, and the slot's list if `node` has none yet."""
    if not relists(old_deadline, deadline):
        return 0
    listed = node is not None and slot_of(deadline) in node.slots
    return LISTING_BYTES + (0 if listed else SLOT_OVERHEAD)


class ExpiryWheel:
    """The nodes' slot lists, earliest slot first."""

    __slots__ = ("_compact_at", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()
        self._compact_at = _COMPACT_FLOOR

    def schedule(self, node: Node, key: str, deadline: float) -> None:
        """List `key` of `node` (in the tree) in the slot of `deadline`."""
        slot = slot_of(deadline)
        keys = node.slots.get(slot)
        cost = LISTING_BYTES
        if keys is None:
            keys = node.slots[slot] = []
            cost += SLOT_OVERHEAD
            heapq.heappush(self._heap, (slot, next(self._seq), node))
            if len(self._heap) > self._compact_at:
                self._compact()
        keys.append(key)
        node.scheduled += 1
        grow(node, cost, 0, 0)

    def take(self, node: Node, slot: int) -> str:
        """Take one listing off `node`'s (in the tree) list for `slot`, which is due, and return its key."""
        keys = node.slots[slot]
        key = keys.pop()
        node.scheduled -= 1
        cost = LISTING_BYTES
        if not keys:
            del node.slots[slot]
            cost += SLOT_OVERHEAD
        grow(node, -cost, 0, 0)
        return key

    def needs_rebuild(self, node: Node) -> bool:
        return node.scheduled > 2 * node.expiring + _REBUILD_FLOOR

    def rebuild(self, node: Node) -> None:
        """List each expiring entry of `node` (in the tree) once, in its own slot, dropping stale listings."""
        grow(node, -(len(node.slots) * SLOT_OVERHEAD + node.scheduled * LISTING_BYTES), 0, 0)
        node.slots = {}
        node.scheduled = 0
        for key, stored in node.entries.items():
            deadline = deadline_of(stored)
            if deadline != math.inf:
                self.schedule(node, key, deadline)

    def _compact(self) -> None:
        """Drop the heap entries of lists that are gone, and duplicates (a rebuild lists a slot anew)."""
        live: dict[tuple[int, int], tuple[int, int, Node]] = {}
        for entry in self._heap:
            slot, _, node = entry
            if slot in node.slots:
                live.setdefault((slot, id(node)), entry)
        self._heap = list(live.values())
        heapq.heapify(self._heap)
        self._compact_at = 2 * len(self._heap) + _COMPACT_FLOOR

    def next_due(self, now: float) -> tuple[int, Node] | None:
        """The earliest slot that has ended by `now` (any slot if `now` is inf), with its node; or None."""
        heap = self._heap
        last = math.floor(now * SLOTS_PER_SECOND) if now != math.inf else math.inf
        while heap and heap[0][0] <= last:
            slot, _, node = heap[0]
            if slot in node.slots:
                return slot, node
            heapq.heappop(heap)  # that list was finished or rebuilt away
        return None
