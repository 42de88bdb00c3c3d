"""The namespace tree: one node per namespace, each holding its own entries.

Namespaces are structural, so `("a", "b")` and `("a_b",)` are different nodes
whatever characters the segments hold, and dropping a namespace subtree is a
single dict removal, whatever the number of keys inside or elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec


class Entry(msgspec.Struct, gc=False):
    """A stored value, its deadline on the storage clock (`inf`: never), and when the index looks at it.

    `scheduled` is the deadline of the entry's one live item in the expiry
    index (`inf`: none). It may be earlier than `deadline`, after a renewal or
    an overwrite pushed the deadline out: the index then reschedules the entry
    when that item comes due, instead of taking a new item for every renewal.
    """

    value: bytes
    deadline: float
    scheduled: float


class Node:
    """One namespace: its own entries and its child namespaces."""

    __slots__ = ("children", "entries", "name", "parent")

    def __init__(self, name: str = "", parent: Node | None = None) -> None:
        self.name = name
        self.parent = parent
        self.children: dict[str, Node] = {}
        self.entries: dict[str, Entry] = {}

    def is_attached_to(self, root: Node) -> bool:
        """Whether this node is still reachable from `root` (not dropped by a delete_all)."""
        node = self
        while node.parent is not None:
            if node.parent.children.get(node.name) is not node:
                return False
            node = node.parent
        return node is root


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
        """The node at `path`, created with its missing ancestors."""
        node = self.root
        for segment in path:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = Node(segment, node)
            node = child
        return node

    def drop(self, path: Sequence[str]) -> None:
        """Remove the namespace at `path` with everything below it, in O(depth)."""
        if not path:
            self.root.children = {}
            self.root.entries = {}
            return
        node = self.find(path)
        if node is not None and node.parent is not None:
            del node.parent.children[node.name]
            self.prune(node.parent)

    def prune(self, node: Node) -> None:
        """Unlink `node` and its ancestors while they hold nothing, so empty namespaces cost no memory."""
        while node.parent is not None and not node.entries and not node.children:
            parent = node.parent
            if parent.children.get(node.name) is node:
                del parent.children[node.name]
            node = parent

    def count(self, path: Sequence[str] = ()) -> int:
        """Number of entries stored at `path` and below, expired or not; walks the subtree."""
        start = self.find(path)
        if start is None:
            return 0
        total, stack = 0, [start]
        while stack:
            node = stack.pop()
            total += len(node.entries)
            stack.extend(node.children.values())
        return total
