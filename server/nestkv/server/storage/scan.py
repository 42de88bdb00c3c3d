"""Scan: a namespace's keys in pages, each page resuming after an opaque cursor.

The order (the same on every node: a cluster merges the nodes' pages by it)
------------------------------------------------------------------------------
Each listed item is (path below the scanned namespace, key). Items are in
depth-first order of the namespace tree: a namespace's own keys first, by key,
then each child namespace's items, by the child's name. Names and keys
compare as strings (code points, which is the order of their UTF-8 bytes).
In one formula, the item (s1, ..., sd), k sorts as the tuple
((1, s1), ..., (1, sd), (0, k)): at the first level where two items differ,
a key of that namespace comes before anything in its child namespaces.

The position of an item is a function of its path and key alone: not of when
it was written, of what else is stored, or of any index. A cursor is the
position of the last item a page looked at (listed, or passed over as expired
or deleted), and the next page lists what is stored after it. So a key stored
for the whole scan is listed exactly once (see `Scanner.page`).

Finding the items after a position without sorting a whole namespace
---------------------------------------------------------------------
A namespace with at most `SORT_LIMIT` keys (or child namespaces) is sorted
when a page reaches it. A larger one gets an index: its keys in a
`SortedKeys` (sorted runs of ~1000 keys), built a step at a time when a scan
first needs it (the page's calls return None meanwhile), and kept complete
while it exists by one hook (`Node.scan`), called when a key is added to the
namespace (`NamespacedStorage._put`) or a child namespace is created
(`NamespaceTree.find_or_create`). The hook only appends the name to a list;
the next page that needs the index takes them in, so writes pay almost
nothing. Removals are not told: an index may hold keys that are gone (a page
looks each one up anyway), and is dropped when those outnumber the live ones
(plus `STALE_FLOOR`), or when no scan used it for `IDLE_SECONDS`. Dropping or
rebuilding an index never moves an item: the next page builds it again and
goes on from the cursor.

Costs (one namespace of 1M keys on the reference machine, bench/scan.py): an
index holds ~8 bytes a key (17 while built), a build ~0.6 s of CPU in ~450
calls, a page of 1000 keys ~1.6 ms, and a set of a new key ~0.06 us more while
an index exists (nothing measurable otherwise).
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import NamedTuple

from nestkv.server.errors import InvalidArgument
from nestkv.server.storage.tree import Node, deadline_of, value_of, version_of

LOAD = 1000
"""Run length of a SortedKeys: runs hold up to 2 * LOAD keys, and LOAD after a split."""
SORT_LIMIT = 4096
"""A namespace with at most this many keys (or child namespaces) is sorted by the page that
needs it; above it, it is indexed."""
BUILD_STEP = 16_384
"""Keys an index build handles per step (a step: ~10 ms on the reference machine)."""
SORT_COST = 8
"""Sorting a key into its run costs about this many keys of dealing (its comparisons touch
keys all over memory)."""
INLINE_ADDS = 16_384
"""Added keys a page takes into an index before going on (~0.4 us each); more take steps."""
IDLE_SECONDS = 60.0
"""An index no page used for this long is dropped (by `ScanIndexes.drop_idle`, from reap)."""
STALE_FLOOR = 4096
"""An index is dropped when it holds more than twice as many keys as its namespace plus this."""
EXAMINE_FACTOR = 4
"""A page looks at most this many times its limit of items (plus 64): expired and deleted ones
cost work without being listed, and a page's time must stay flat."""


# The cursor.

_MAGIC = b"NS"
_VERSION = 1
_RECURSIVE = 1
_HEAD = struct.Struct(">2sBB8sH")  # magic, version, flags, scope, depth
_LENGTH = struct.Struct(">I")
_CRC = struct.Struct(">I")


class Position(NamedTuple):
    """Where a scan is: the path (below the scanned namespace) and key of the last item looked at."""

    path: tuple[str, ...]
    key: str


def scope_of(path: Sequence[str], recursive: bool) -> bytes:
    """What a cursor is bound to: the scanned namespace (as the storage sees it) and the mode."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"r" if recursive else b"f")
    for segment in path:
        data = segment.encode()
        digest.update(_LENGTH.pack(len(data)) + data)
    return digest.digest()


def encode_cursor(path: Sequence[str], recursive: bool, position: Position) -> bytes:
    """The opaque cursor of `position` in a scan of `path`.

    Layout (big-endian): "NS", version 1, flags (1: recursive), 8 bytes of the scope
    (`scope_of`), u16 depth, then each segment of the position's path and its key as u32 length
    and UTF-8 bytes, then the CRC-32 of all that.
    """
    parts = [
        _HEAD.pack(
            _MAGIC, _VERSION, _RECURSIVE if recursive else 0, scope_of(path, recursive), len(position.path)
        )
    ]
    for text in (*position.path, position.key):
        data = text.encode()
        parts += (_LENGTH.pack(len(data)), data)
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def _malformed(why: str) -> InvalidArgument:
    return InvalidArgument(
        f"cursor is not one this scan gave out ({why}): pass the cursor of the previous page as it "
        "came, with the same namespace and recursive flag, or an empty cursor to start over",
        field="cursor",
    )


def decode_cursor(cursor: bytes, path: Sequence[str], recursive: bool) -> Position | None:
    """The position `cursor` holds for a scan of `path`; None for an empty cursor (the start).

    Raises InvalidArgument (field "cursor") for anything `encode_cursor` did not make for this
    namespace and mode.
    """
    if not cursor:
        return None
    if len(cursor) < _HEAD.size + _LENGTH.size + _CRC.size:
        raise _malformed("too short")
    body, (crc,) = cursor[: -_CRC.size], _CRC.unpack(cursor[-_CRC.size :])
    magic, version, flags, scope, depth = _HEAD.unpack_from(body)
    if magic != _MAGIC:
        raise _malformed("not a scan cursor")
    if version != _VERSION:
        raise _malformed(f"cursor version {version}, this server reads version {_VERSION}")
    if zlib.crc32(body) != crc:
        raise _malformed("damaged: its checksum does not match")
    if flags != (_RECURSIVE if recursive else 0) or scope != scope_of(path, recursive):
        raise _malformed("it belongs to a scan of another namespace, or with the other recursive flag")
    if depth and not recursive:
        raise _malformed("a path in a scan that is not recursive")
    texts: list[str] = []
    offset = _HEAD.size
    for _ in range(depth + 1):
        if offset + _LENGTH.size > len(body):
            raise _malformed("truncated")
        (length,) = _LENGTH.unpack_from(body, offset)
        offset += _LENGTH.size
        if offset + length > len(body):
            raise _malformed("truncated")
        try:
            texts.append(body[offset : offset + length].decode())
        except UnicodeDecodeError:
            raise _malformed("not UTF-8") from None
        offset += length
    if offset != len(body):
        raise _malformed("trailing bytes")
    return Position(tuple(texts[:-1]), texts[-1])


# The index.


class SortedKeys:
    """A sorted set of strings: sorted runs (tuples) of about LOAD keys, the largest key of each,
    and the keys added to each run since it was last sorted.

    Adding costs a bisection of the runs' largest keys (a few KB, warm in the cache) and an
    append. A run takes its added keys in when it is iterated: one C sort of the run with them
    (which finds the run sorted), then split if it grew past 2 * LOAD. Comparing keys all over
    memory one by one in Python, as an insertion into a sorted list does, costs ~3 us a key;
    this way the comparisons are those of a sort, over keys the page is about to read anyway.
    Runs are tuples of str, which the garbage collector stops tracking: a full collection does
    not walk an index of a million keys (~40 ms if it did).
    """

    __slots__ = ("_added", "_maxes", "_runs", "_size")

    def __init__(self, runs: Sequence[Sequence[str]] = ()) -> None:
        """`runs`: sorted, non-empty sequences, each key below the next one's keys (tuples are
        kept as they are)."""
        self._runs: list[tuple[str, ...]] = []
        for run in runs:
            if len(run) <= 2 * LOAD:
                self._runs.append(tuple(run))
            else:
                self._runs += (tuple(run[start : start + LOAD]) for start in range(0, len(run), LOAD))
        self._maxes = [run[-1] for run in self._runs]
        self._added: list[list[str] | None] = [None] * len(self._runs)
        self._size = sum(map(len, self._runs))

    def __len__(self) -> int:
        """Keys held; a key added again before its run was sorted counts twice until then."""
        return self._size

    def add(self, key: str) -> None:
        """Add `key` (if it is held already, the run drops the copy when it is sorted)."""
        maxes = self._maxes
        self._size += 1
        if not maxes:
            self._runs.append((key,))
            maxes.append(key)
            self._added.append(None)
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            maxes[i] = key
        added = self._added[i]
        if added is None:
            self._added[i] = [key]
        else:
            added.append(key)

    def _sort(self, i: int) -> None:
        """Take the keys added to run `i` into it, and split it if it grew past 2 * LOAD."""
        added = self._added[i]
        assert added is not None
        run = self._runs[i]
        merged = tuple(dict.fromkeys(sorted((*run, *added))))  # sorted, without the copies
        self._size -= len(run) + len(added) - len(merged)
        if len(merged) <= 2 * LOAD:
            self._runs[i], self._added[i] = merged, None
            return
        parts = [merged[start : start + LOAD] for start in range(0, len(merged), LOAD)]
        self._runs[i : i + 1] = parts
        self._maxes[i : i + 1] = [part[-1] for part in parts]
        self._added[i : i + 1] = [None] * len(parts)

    def after(self, key: str | None) -> Iterator[str]:
        """The keys above `key` (None: all), in order. Nothing may be added meanwhile."""
        runs, added, maxes = self._runs, self._added, self._maxes
        i = 0
        if key is not None:  # the first run that may hold keys above it, sorted: maybe split
            while (i := bisect_right(maxes, key)) < len(runs) and added[i] is not None:
                self._sort(i)
            if i == len(runs):
                return
            run = runs[i]
            yield from islice(run, bisect_right(run, key), None)
            i += 1
        while i < len(runs):
            if added[i] is not None:
                self._sort(i)  # split or not, run i is the first of what it held
            yield from runs[i]
            i += 1


class _Build:
    """An index being built by sample sort, a step at a time: snapshot the names; pick splitters
    from a sample; deal each name to the bucket between two splitters; sort each bucket into a
    run. No step takes more than about BUILD_STEP keys' worth of work, but for the snapshot (one
    list of every name: ~20 ms for a million)."""

    __slots__ = ("buckets", "position", "runs", "snapshot", "splitters")

    _random = random.Random()

    def __init__(self, names: list[str]) -> None:
        self.snapshot = names
        self.splitters: list[str] | None = None
        self.buckets: list[list[str]] = []
        self.runs: list[tuple[str, ...]] = []
        self.position = 0  # in snapshot while dealing, then in buckets while sorting

    def step(self, budget: int) -> SortedKeys | None:
        """Do about `budget` keys of work; the index once it is complete."""
        names = self.snapshot
        if self.splitters is None:
            count = max(len(names) // LOAD, 1)
            sample = sorted(self._random.sample(names, min(len(names), 8 * count)))
            self.splitters = sample[8::8][: count - 1]  # 8 times over-sampled: buckets near LOAD
            self.buckets = [[] for _ in range(len(self.splitters) + 1)]
            return None
        if self.position < len(names):
            buckets, splitters = self.buckets, self.splitters
            for name in names[self.position : self.position + budget]:
                buckets[bisect_right(splitters, name)].append(name)
            self.position += budget
            if self.position >= len(names):
                self.snapshot, self.position = [], 0
            return None
        done = 0
        buckets = self.buckets
        while self.position < len(buckets) and done < budget:
            bucket = buckets[self.position]
            buckets[self.position] = []
            if bucket:
                bucket.sort()  # keys all over memory: ~1 us a key for a bucket of LOAD
                self.runs.append(tuple(bucket))
            done += SORT_COST * len(bucket) + 1
            self.position += 1
        if self.position < len(buckets):
            return None
        return SortedKeys(self.runs)


class _Index:
    """The index of one dict of a node (its entries, or its children's names).

    It holds every name its dict held since it was begun: those of the snapshot the build
    started from, and each one added since (`added`, told by the hook, taken into `keys` by the
    pages that need them: a write only appends). Names removed since may still be in it.
    """

    __slots__ = ("added", "build", "keys", "source")

    def __init__(self, source: Mapping[str, object]) -> None:
        self.source = source  # the very dict indexed: a root emptied by delete_all gets a new one
        self.added: list[str] = []
        self.keys: SortedKeys | None = None
        self.build: _Build | None = _Build(list(source))

    def ready(self, inline: int) -> bool:
        """Whether `keys` holds every name; takes the added ones in first if at most `inline`."""
        if self.keys is None or len(self.added) > inline:
            return False
        if self.added:
            self._take_added(len(self.added))
        return True

    def step(self, budget: int) -> None:
        """Do about `budget` keys of work towards `ready`."""
        if self.build is None:
            self._take_added(budget)
            return
        keys = self.build.step(budget)
        if keys is not None:
            self.keys, self.build = keys, None

    def _take_added(self, count: int) -> None:
        keys, added = self.keys, self.added
        assert keys is not None
        taken = added[-count:]
        del added[-count:]
        for name in taken:
            keys.add(name)

    def size(self) -> int:
        """Names held, removed ones included (and added ones twice, if added back)."""
        held = len(self.keys) if self.keys is not None else len(self.build.snapshot) if self.build else 0
        return held + len(self.added)


class NodeIndex:
    """What a node holds while it is indexed (`Node.scan`): the index of its keys, of its children's
    names, or both, and when a page last used it."""

    __slots__ = ("children", "entries", "used")

    def __init__(self) -> None:
        self.entries: _Index | None = None
        self.children: _Index | None = None
        self.used = 0.0

    def key_added(self, key: str) -> None:
        """The hook: `key` was added to the node's entries (it was not there)."""
        if self.entries is not None:
            self.entries.added.append(key)

    def child_added(self, name: str) -> None:
        """The hook: the child namespace `name` was created under the node."""
        if self.children is not None:
            self.children.added.append(name)


class ScanIndexes:
    """The nodes that have an index, to drop them when idle or stale."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: dict[Node, NodeIndex] = {}

    def index_of(self, node: Node, children: bool, now: float) -> _Index:
        """The index of the node's entries (or children), made if it has none."""
        holder = node.scan
        if holder is None:
            holder = node.scan = self.nodes[node] = NodeIndex()
        holder.used = now
        source: Mapping[str, object] = node.children if children else node.entries
        index = holder.children if children else holder.entries
        if index is None or index.source is not source:
            index = _Index(source)
            if children:
                holder.children = index
            else:
                holder.entries = index
        return index

    def drop_idle(self, root: Node, now: float, idle: float = IDLE_SECONDS) -> int:
        """Drop the indexes no page used for `idle` seconds, that hold mostly removed names, or
        of namespaces no longer under `root` (dropped by a delete_all); how many nodes lost theirs."""
        dropped = 0
        for node, holder in list(self.nodes.items()):
            stale = any(
                index is not None and index.size() > 2 * len(index.source) + STALE_FLOOR
                for index in (holder.entries, holder.children)
            )
            if stale or now - holder.used >= idle or not node.is_attached_to(root):
                self.drop(node)
                dropped += 1
        return dropped

    def drop(self, node: Node) -> None:
        node.scan = None
        del self.nodes[node]

    def held(self) -> int:
        """Names held by the indexes (built or building), removed ones included."""
        total = 0
        for holder in self.nodes.values():
            for index in (holder.entries, holder.children):
                if index is not None:
                    total += index.size()
        return total


# The pages.


ScanItem = tuple[tuple[str, ...], str, bytes | None, bytes, float]
"""One listed key: (its path below the scanned namespace, () for the namespace's own keys; the
key; its value, None unless the scan asks for values; its version; its deadline on the storage
clock, inf: none). A plain tuple, not a NamedTuple: the garbage collector stops tracking a
tuple of str, bytes and floats, never an instance of a subclass, and a page's thousand items
promoted to the old generation would bring full collections on ~8 times as often."""


class ScanPage(NamedTuple):
    items: list[ScanItem]
    cursor: bytes
    """To pass for the next page; empty once the scan is complete."""
    done: bool


class _NeedIndex(Exception):
    def __init__(self, node: Node, children: bool) -> None:
        self.node, self.children = node, children


class Scanner:
    """Pages of a namespace tree (the storage's), with the indexes they need."""

    __slots__ = ("indexes",)

    def __init__(self, indexes: ScanIndexes) -> None:
        self.indexes = indexes

    def page(
        self,
        start: Node | None,
        path: Sequence[str],
        cursor: bytes,
        limit: int,
        now: float,
        *,
        recursive: bool = False,
        values: bool = False,
    ) -> ScanPage | None:
        """Up to `limit` live items of the namespace `start` (at `path`; None if it holds
        nothing) after `cursor`, with the cursor after them; None if no item could be looked at
        yet because an index is being built (a step of it was done: call again, after letting
        others run).

        Exactly once: the items are looked at in increasing order of position, from just after
        the cursor, and the returned cursor is the position of the last one looked at. Every
        key stored at a position in between while the page ran was looked at: a sorted
        namespace is sorted from its dict, an index holds every key its dict held since the
        index was begun (the snapshot, then the hook). So consecutive pages look at disjoint,
        adjacent ranges of positions, and a key stored throughout is in one of them, where it
        is live and listed.
        """
        if limit < 1:
            raise InvalidArgument(f"page size {limit}: it must be at least 1", field="limit")
        after = decode_cursor(cursor, path, recursive)
        items: list[ScanItem] = []
        last_path: tuple[str, ...] | None = None  # of the last item looked at: None, none yet
        last_key = ""
        budget = EXAMINE_FACTOR * limit + 64
        exhausted = True
        try:
            if start is not None:
                for item_path, node, key in self._walk(start, after, recursive, now):
                    last_path, last_key = item_path, key
                    stored = node.entries.get(key)
                    if stored is not None and (deadline := deadline_of(stored)) > now:
                        value = value_of(stored) if values else None
                        items.append((item_path, key, value, version_of(stored), deadline))
                    budget -= 1
                    if len(items) >= limit or budget <= 0:
                        exhausted = False
                        break
        except _NeedIndex as need:
            self.indexes.index_of(need.node, need.children, now).step(BUILD_STEP)
            if last_path is None:
                return None
            exhausted = False
        if exhausted:
            return ScanPage(items, b"", True)
        last = after if last_path is None else Position(last_path, last_key)
        assert last is not None  # a page that stops early has looked at an item
        return ScanPage(items, encode_cursor(path, recursive, last), False)

    def _names(self, node: Node, after: str | None, children: bool, now: float) -> Iterator[str]:
        """The keys (or children's names) of `node` above `after`, in order; some may be gone."""
        holder = node.scan
        index = None if holder is None else holder.children if children else holder.entries
        source = node.children if children else node.entries
        if index is not None and index.source is source and index.ready(INLINE_ADDS):
            assert holder is not None
            assert index.keys is not None
            holder.used = now
            return index.keys.after(after)
        if len(source) <= SORT_LIMIT:
            return iter(sorted(source if after is None else filter(after.__lt__, source)))
        raise _NeedIndex(node, children)

    def _walk(
        self, start: Node, after: Position | None, recursive: bool, now: float
    ) -> Iterator[tuple[tuple[str, ...], Node, str]]:
        """(path, node, key) of every key at or below `start` (below: if `recursive`) after
        `after`, in order; the tree must not change meanwhile."""
        if after is None:
            yield from self._subtree((), start, recursive, now)
            return
        path = after.path
        nodes = [start]
        for segment in path:
            child = nodes[-1].children.get(segment)
            if child is None:
                break
            nodes.append(child)
        if len(nodes) == len(path) + 1:  # the namespace of the last item is still there
            node = nodes[-1]
            for key in self._names(node, after.key, False, now):
                yield path, node, key
            if recursive:
                yield from self._children(path, node, None, now)
        for depth in range(min(len(nodes), len(path)) - 1, -1, -1):
            yield from self._children(path[:depth], nodes[depth], path[depth], now)

    def _subtree(
        self, path: tuple[str, ...], node: Node, recursive: bool, now: float
    ) -> Iterator[tuple[tuple[str, ...], Node, str]]:
        for key in self._names(node, None, False, now):
            yield path, node, key
        if recursive:
            yield from self._children(path, node, None, now)

    def _children(
        self, path: tuple[str, ...], node: Node, after: str | None, now: float
    ) -> Iterator[tuple[tuple[str, ...], Node, str]]:
        children = node.children
        for name in self._names(node, after, True, now):
            child = children.get(name)
            if child is not None:
                yield from self._subtree((*path, name), child, True, now)
