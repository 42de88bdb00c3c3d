"""The namespace tree: one node per namespace, each holding its own entries.

Namespaces are structural, so `("a", "b")` and `("a_b",)` are different nodes
whatever characters the segments hold, and dropping a namespace subtree is a
single dict removal, whatever the number of keys inside or elsewhere.

An entry is one bytes object: the value, then its version (16 bytes, see
storage.clock), then its deadline as an 8-byte float (`inf`: never). One
object per entry, instead of a value, a record and a float, is what keeps
memory per key near Redis's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nestkv.server.storage.scan import NodeIndex

_DEADLINE = struct.Struct("<d")
_TRAILER = struct.Struct("<16sd")
TRAILER_BYTES = _TRAILER.size
"""Bytes an entry holds beyond its value: its version and its deadline."""
_pack_trailer = _TRAILER.pack

NAMESPACE_OVERHEAD = 480
"""Bytes a namespace costs beyond its name: the node and its three dicts, the small tables its
first child and first entry make them allocate, its slot in its parent's children and the name's
object header. Calibrated with tracemalloc on CPython 3.11 (tests/server/storage/test_engine.py,
`test_used_memory_follows_what_the_entries_really_allocate`), for the shapes a tenant could
choose: one namespace per key, chains 32 deep, 256-byte names."""


def text_bytes(text: str) -> int:
    """What a str may hold in memory: its characters, and a UTF-8 copy if it is not ASCII.

    gRPC and protobuf ask a str for its UTF-8 form, which CPython then keeps beside the
    characters; neither takes more bytes a character than the UTF-8 form.
    """
    return len(text) if text.isascii() else 2 * len(text.encode())


def namespace_size(name: str) -> int:
    """Bytes a namespace named `name` is accounted, whatever it holds."""
    return NAMESPACE_OVERHEAD + text_bytes(name)


def pack(value: bytes, version: bytes, deadline: float) -> bytes:
    """The stored form of `value` with `version` and `deadline`."""
    return value + _pack_trailer(version, deadline)


def deadline_of(stored: bytes) -> float:
    return float(_DEADLINE.unpack_from(stored, len(stored) - 8)[0])


def version_of(stored: bytes) -> bytes:
    return stored[-TRAILER_BYTES:-8]


def value_of(stored: bytes) -> bytes:
    return stored[:-TRAILER_BYTES]


class Node:
    """One namespace: its entries, its child namespaces, and its slots of the expiry wheel.

    `slots` maps a time slot to keys that may expire in it (see
    storage.expiry); `expiring` counts the entries that have a deadline, and
    `scheduled` the keys listed in `slots`, stale ones included.
    `subtree_bytes`, `subtree_keys` and `subtree_expiring` are the accounted
    size, the number and the number with a deadline of the entries of this
    node and every node below it; the size counts the namespaces themselves
    (`namespace_size`) and their expiry listings too (storage.expiry), the
    root's own excepted, since it is always there.
    """

    __slots__ = (
        "children",
        "entries",
        "expiring",
        "name",
        "parent",
        "scan",
        "scheduled",
        "slots",
        "subtree_bytes",
        "subtree_expiring",
        "subtree_keys",
    )

    def __init__(self, name: str = "", parent: Node | None = None) -> None:
        self.name = name
        self.parent = parent
        self.children: dict[str, Node] = {}
        self.entries: dict[str, bytes] = {}
        self.slots: dict[int, list[str]] = {}
        self.scan: NodeIndex | None = None
        """Its scan indexes, while a scan keeps them (storage.scan): told of each key and child added."""
        self.expiring = 0
        self.scheduled = 0
        self.subtree_bytes = 0
        self.subtree_keys = 0
        self.subtree_expiring = 0

    def is_attached_to(self, root: Node) -> bool:
        """Whether this node is still reachable from `root` (not dropped by a delete_all)."""
        node = self
        while node.parent is not None:
            if node.parent.children.get(node.name) is not node:
                return False
            node = node.parent
        return node is root


def grow(node: Node, delta_bytes: int, delta_keys: int, delta_expiring: int) -> None:
    """Add to the subtree totals of `node` and each of its ancestors: the one place they change."""
    here: Node | None = node
    while here is not None:
        here.subtree_bytes += delta_bytes
        here.subtree_keys += delta_keys
        here.subtree_expiring += delta_expiring
        here = here.parent


class NamespaceTree:
    """The tree of namespaces below one root."""

    __slots__ = ("root",)

    def __init__(self) -> None:
        self.root = Node()

    def find(self, path: Sequence[str]) -> Node | None:
        """The node at `path`, or None if that namespace holds nothing."""
        node = self.root
        for segment in path:
            child = node.children.get(segment)
            if child is None:
                return None
            node = child
        return node

    def find_or_create(self, path: Sequence[str]) -> Node:
        """The node at `path`, created with its missing ancestors (each accounted as it is made)."""
        node = self.root
        for segment in path:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = Node(segment, node)
                grow(child, namespace_size(segment), 0, 0)
                if node.scan is not None:
                    node.scan.child_added(segment)
            node = child
        return node

    def creation_size(self, path: Sequence[str]) -> int:
        """Bytes `find_or_create(path)` would add: the namespaces of `path` that do not exist yet."""
        node: Node | None = self.root
        size = 0
        for segment in path:
            node = None if node is None else node.children.get(segment)
            if node is None:
                size += namespace_size(segment)
        return size

    def drop(self, path: Sequence[str]) -> Node | None:
        """Detach the namespace at `path` with everything below it, in O(depth); return what was detached.

        The detached node still holds its entries: freeing them is the caller's
        business (the engine does it in the background, a chunk at a time).
        """
        if not path:
            dropped = Node()
            root = self.root
            dropped.children, dropped.entries, dropped.slots = root.children, root.entries, root.slots
            dropped.subtree_bytes, dropped.subtree_keys = root.subtree_bytes, root.subtree_keys
            dropped.subtree_expiring = root.subtree_expiring
            root.children, root.entries, root.slots = {}, {}, {}
            root.expiring = root.scheduled = root.subtree_bytes = root.subtree_keys = (
                root.subtree_expiring
            ) = 0
            return dropped
        node = self.find(path)
        if node is None or node.parent is None:
            return None
        grow(node.parent, -node.subtree_bytes, -node.subtree_keys, -node.subtree_expiring)
        del node.parent.children[node.name]
        self.prune(node.parent)
        return node

    def prune(self, node: Node) -> None:
        """Unlink `node` and its ancestors while they hold nothing, so empty namespaces cost no memory.

        A pruned node's expiry listings (stale: it holds no entries) go with it; the wheel skips
        its slots when they come due.
        """
        while node.parent is not None and not node.entries and not node.children:
            parent = node.parent
            if parent.children.get(node.name) is node:
                node.slots = {}
                node.scheduled = 0
                grow(parent, -node.subtree_bytes, 0, 0)
                node.subtree_bytes = 0
                del parent.children[node.name]
            node = parent

    def walk(self, path: Sequence[str] = ()) -> Iterator[tuple[tuple[str, ...], Node]]:
        """Every node at `path` and below, with its own path."""
        start = self.find(path)
        stack = [] if start is None else [(tuple(path), start)]
        while stack:
            here, node = stack.pop()
            yield here, node
            stack.extend(((*here, name), child) for name, child in node.children.items())
