"""The deadline index behind active expiry.

A min-heap of `(deadline, seq, node, key)`, at most one live item per entry
(the one whose deadline is the entry's `scheduled`). Renewals and overwrites
that push a deadline out add nothing: the engine reschedules the entry when
its item comes due. Deletes, delete_all and shortened deadlines never search
the heap: they leave stale items behind, which are recognised and skipped when
popped. So that stale items cannot pile up, the heap is rebuilt from its live
items whenever it has doubled since the last rebuild: O(1) amortized per
insertion.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from server.storage.tree import Node

Item = tuple[float, int, Node, str]
IsLive = Callable[[float, Node, str], bool]

_MIN_COMPACT_SIZE = 1024


class ExpiryIndex:
    """Deadlines of the entries that have one, earliest first."""

    __slots__ = ("_compact_at", "_heap", "_is_live", "_seq")

    def __init__(self, is_live: IsLive) -> None:
        self._heap: list[Item] = []
        self._seq = itertools.count()
        self._is_live = is_live
        self._compact_at = _MIN_COMPACT_SIZE

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, node: Node, key: str) -> None:
        """Record that `node.entries[key]` expires at `deadline`."""
        heapq.heappush(self._heap, (deadline, next(self._seq), node, key))
        if len(self._heap) >= self._compact_at:
            self.compact()

    def pop_due(self, now: float, limit: int) -> list[tuple[float, Node, str]]:
        """Remove and return up to `limit` items whose deadline is `now` or earlier."""
        heap = self._heap
        due: list[tuple[float, Node, str]] = []
        while heap and heap[0][0] <= now and len(due) < limit:
            deadline, _, node, key = heapq.heappop(heap)
            due.append((deadline, node, key))
        return due

    def compact(self) -> None:
        """Drop the stale items and re-arm the next rebuild at twice the live size."""
        is_live = self._is_live
        self._heap = [item for item in self._heap if is_live(item[0], item[2], item[3])]
        heapq.heapify(self._heap)
        self._compact_at = max(_MIN_COMPACT_SIZE, 2 * len(self._heap))
