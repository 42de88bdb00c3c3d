"""The expiry wheel behind active expiry.

Time is cut into slots of 1/SLOTS_PER_SECOND s. Each namespace node lists,
per slot, the keys that may expire in it (`Node.slots`), and a min-heap holds
`(slot, seq, node)` once per list, so that the reaper finds the due lists in
order. A key costs one list item (8 bytes), not a heap item of its own.

Invariant: every entry with a deadline is listed in a slot no later than its
deadline's. Renewals and overwrites that push a deadline out list nothing
new: when the old slot comes due, the reaper moves the key to its new slot.
A shortened deadline lists the key again in the earlier slot. Deletes leave
stale listings behind, skipped when their slot comes due; a node whose
listings outnumber twice its expiring entries (plus a floor) has its slots
rebuilt, which keeps them O(live entries) at O(1) amortized cost per listing.
"""

from __future__ import annotations

import heapq
import itertools
import math

from nestkv.server.storage.tree import Node, deadline_of

SLOTS_PER_SECOND = 10
_REBUILD_FLOOR = 64


def slot_of(deadline: float) -> int:
    """The slot whose end is the first at or after `deadline`."""
    return math.ceil(deadline * SLOTS_PER_SECOND)


class ExpiryWheel:
    """The nodes' slot lists, earliest slot first."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()

    def schedule(self, node: Node, key: str, deadline: float) -> None:
        """List `key` of `node` in the slot of `deadline`."""
        slot = slot_of(deadline)
        keys = node.slots.get(slot)
        if keys is None:
            keys = node.slots[slot] = []
            heapq.heappush(self._heap, (slot, next(self._seq), node))
        keys.append(key)
        node.scheduled += 1

    def needs_rebuild(self, node: Node) -> bool:
        return node.scheduled > 2 * node.expiring + _REBUILD_FLOOR

    def rebuild(self, node: Node) -> None:
        """List each expiring entry of `node` once, in its own slot, dropping the stale listings."""
        node.slots = {}
        node.scheduled = 0
        for key, stored in node.entries.items():
            deadline = deadline_of(stored)
            if deadline != math.inf:
                self.schedule(node, key, deadline)

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
