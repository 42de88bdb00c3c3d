"""Hand-off: when the members change, each key moves to its new owner, and none is lost or unseen.

Every node runs a *pass* when it starts and whenever its member list
changes (or a key it does not own was written to it by a peer that placed
it by an older list): it sends every key it holds but does not own, with
the time it has left, to the key's owner on a HandOff stream, and drops
each key once the owner has answered, unless it changed meanwhile. The last
message to every other member, keys or not, says `done` for that version.

A pass sends tombstones too: those of keys others own to their owner, and
those of emptied namespaces to every member. The receiving side merges
what arrives by version (NamespacedStorage.merge): a copy is stored only if
it is newer than what the receiver holds and than every tombstone over it,
so the last write wins, wherever it was made and whatever order the copies
come in. Until every member of the previous list has said `done` for the
current version, a read that misses is asked of the key's previous owner,
whose copy is merged here the same way, so a key is never unseen while it
travels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from nestkv.server.cluster.topology import Membership, Topology
from nestkv.server.storage import NEVER, NamespacedStorage
from nestkv.server.storage.clock import LEGACY, MAX_PEER_AHEAD, VERSION_BYTES, describe
from nestkv.server.storage.tree import text_bytes, value_of, version_of
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import store_pb2 as pb

log = logging.getLogger("nestkv.server")

MESSAGE_BYTES = 1024 * 1024
"""Bytes of keys, values and paths a HandOffRequest (of a hand-off or a CatchUp answer) carries,
about: far below any receiver's limit, whatever the number of entries or tombstones."""
_ITEM_BYTES = 48  # a version, a deadline and the framing of one entry, tombstone or namespace
_YIELD_EVERY = 2_000  # keys looked at between two yields to the event loop
_RETRY = 1.0  # seconds before a member that could not be reached is tried again, doubling
_MAX_RETRY = 30.0
_SETTLE = 10.0  # seconds before keys a peer placed here by a list this node does not know go on
_WINDOW = 600.0  # seconds after a change that misses may be asked of previous owners, at most


class HandOff:
    """This node's side of hand-offs: what it sends, what it takes in, where a miss is asked next."""

    def __init__(
        self,
        membership: Membership,
        storage: NamespacedStorage,
        open_stream: Callable[[str], Any],
        *,
        commit: Callable[[], None],
        writable: Callable[[], None],
    ) -> None:
        """`open_stream(address)` opens a HandOff call to a member; `commit` makes writes durable,
        and `writable` raises StoreUnavailable when they cannot be (persistence)."""
        self._membership = membership
        self._storage = storage
        self._commit = commit
        self._writable = writable
        self._open_stream = open_stream
        self._needed = asyncio.Event()
        self._needed.set()  # a pass at start: the data directory may hold keys others own now
        self.passed = asyncio.Event()  # the last pass covered the current members (for the drain)
        self.known = asyncio.Event()
        """Set once another member took this node's list (answered a hand-off as a peer): clients
        may be sent here then (readiness). Until then nobody else may know this node's list."""
        current = membership.current
        others = current.others(membership.node_id)
        # At start, the list before is unknown: take it to be this one without this node (a node added).
        self.previous: Topology | None = membership.topology(others) if others else None
        self._done_from: dict[str, str] = {}
        self._given_up: set[str] = set()  # removed members that did not answer when asked
        self._open_until = time.monotonic() + _WINDOW if self.previous is not None else 0.0
        self._later: asyncio.TimerHandle | None = None
        self.passed_version = ""
        """The topology version of the last complete pass: this node holds no key others own under it."""
        self.sent = 0
        self._warned = 0.0  # when a change from a clock far ahead was last said to be left out
        self._open = self.previous is not None
        if not others:
            self.known.set()
        membership.listeners.append(self._changed)

    def _changed(self, previous: Topology, current: Topology) -> None:
        self.previous = previous
        self._given_up.clear()
        self._open_until = time.monotonic() + _WINDOW
        self.again()
        self._reopen()

    def again(self) -> None:
        """Run a pass (again) now."""
        self.passed.clear()
        self._needed.set()

    def holds_nothing(self) -> bool:
        return self._storage.keys == 0

    def _reopen(self) -> None:
        self._open = bool(self._expecting())

    @property
    def open(self) -> bool:
        """Whether keys may still be on their way here: a miss is then asked of the previous owner.

        Until every member of the previous list has said it is done, for at most _WINDOW seconds.
        """
        return self._open and time.monotonic() < self._open_until

    def write_elsewhere(self, sender_version: str = "") -> None:
        """A key this node does not own was written here by a peer that placed it by another list.

        If that list is this node's previous one, the peer is behind: the key goes on at once.
        Otherwise this node may be the one behind, and sending the key back now would only bounce
        it between the two: its own change will pass it on; a pass comes later in any case.
        """
        self.passed.clear()  # it holds a key others own: a drain is not over
        if sender_version and self.previous is not None and sender_version == self.previous.version:
            self._needed.set()
        elif self._later is None:
            self._later = asyncio.get_running_loop().call_later(_SETTLE, self._pass_later)

    def _pass_later(self) -> None:
        self._later = None
        self._needed.set()

    # The receiving side.

    def _expecting(self) -> set[str]:
        previous = self.previous
        if previous is None:
            return set()
        version = self._membership.current.version
        node_id = self._membership.node_id
        return {
            member
            for member in previous.others(node_id)
            if self._done_from.get(member) != version and member not in self._given_up
        }

    def previous_owner(self, path: Sequence[str], key: str) -> str | None:
        """The member to ask about a key missing here while hand-offs run; None: the miss stands."""
        previous = self.previous
        if previous is None or not self.open:
            return None
        owner = previous.owner(path, key)
        return owner if owner in self._expecting() else None

    def unanswered(self, member: str) -> bool:
        """The previous owner `member` did not answer an ask: whether the miss stands.

        It does if `member` is no longer a member (taken off the list, dead or not: the operator
        gave its keys up), and then it is asked no more; otherwise the caller hears UNAVAILABLE.
        """
        if member in self._membership.current.members:
            return False
        self._given_up.add(member)
        self._reopen()
        return True

    def merge_asked(self, path: Sequence[str], key: str, copy: pb.GetResponse) -> None:
        """Merge here the copy a previous owner answered an ask with (a GetResponse with_version,
        from a node that has versions)."""
        if copy.found and (not copy.version or self._sane("a previous owner", copy.version)):
            deadline = _deadline(copy, self._storage.now())
            # Without making room: the copy is on its way here anyway (the hand-off makes room).
            self._storage.merge(path, key, copy.version or LEGACY, copy.value, deadline, make_room=False)

    def take(self, sender: str, request: peer_pb.HandOffRequest) -> tuple[int, int]:
        """Merge the entries and tombstones of one HandOffRequest here, durably; (stored, skipped):
        what was newer than anything here, and what was not.

        Raises StoreFault if they cannot be stored (the sender keeps them and tries again).
        """
        self._writable()
        storage = self._storage
        stored = skipped = 0
        for emptied in request.emptied:
            if self._sane(f"node {sender}", emptied.version):
                storage.merge_subtree(emptied.path, emptied.version)
        for tombstone in request.tombstones:
            changed = self._sane(f"node {sender}", tombstone.version) and storage.merge(
                tombstone.path, tombstone.key, tombstone.version
            )
            stored += changed
            skipped += not changed
        now = storage.now()
        for entry in request.entries:
            version = entry.version or LEGACY  # from a node older than versions: older than any
            if not self._sane(f"node {sender}", version):
                skipped += 1
                continue
            deadline = _deadline(entry, now)
            changed = deadline > now and storage.merge(entry.path, entry.key, version, entry.value, deadline)
            stored += changed
            skipped += not changed
        if request.done:
            self._done_from[sender] = request.topology_version
            self._reopen()
        if request.topology_version == self._membership.current.version:
            self.known.set()  # a member placed keys by this node's list: it has taken it
        if stored:
            node_id = self._membership.node_id
            current = self._membership.current
            if any(not current.holds(node_id, entry.path, entry.key) for entry in request.entries):
                self.write_elsewhere(request.topology_version)
        self._commit()
        return stored, skipped

    def _sane(self, sender: str, version: bytes) -> bool:
        """Whether a version `sender` (who, in words) sent is a version, from a clock not far
        ahead of this one's (see MAX_PEER_AHEAD): a change stamped by a clock that is wrong is
        left out, said once a minute, and the rest of a hand-off or catch-up goes on."""
        if len(version) == VERSION_BYTES and self._storage.versions.ahead(version) <= MAX_PEER_AHEAD:
            return True
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            log.warning(
                "left out a change from %s stamped %s: not a version within %g s of this node's "
                "clock (is that node's clock set right?)",
                sender,
                describe(version) if len(version) == VERSION_BYTES else version.hex(),
                MAX_PEER_AHEAD,
            )
        return False

    # The sending side.

    async def copies_for(self, member: str) -> AsyncIterator[peer_pb.HandOffRequest]:
        """Everything this node holds of the keys `member` keeps a copy of, tombstones and emptied
        namespaces included (the answer to its CatchUp)."""
        topology = self._membership.current
        storage = self._storage
        entries = []
        looked = 0
        for path, node in list(storage.namespaces()):
            for key, stored in storage.entries(node):
                looked += 1
                if looked % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if topology.holds(member, path, key):
                    entries.append((path, key, stored))
        buried: list[tuple[tuple[str, ...], str, bytes]] = []
        emptied: list[tuple[tuple[str, ...], bytes]] = []
        if storage.tombstones is not None:
            keys, emptied = storage.tombstones.versions()
            buried = [
                (path, key, version) for path, key, version in keys if topology.holds(member, path, key)
            ]
        async for request in _messages(storage, topology.version, entries, buried, emptied, done=False):
            yield request

    async def run_forever(self) -> None:
        """Run a pass whenever one is needed, until cancelled."""
        failures = 0
        while True:
            await self._needed.wait()
            self._needed.clear()
            topology = self._membership.current
            try:
                complete = await self._pass(topology)
            except Exception:
                log.exception("hand-off pass failed; trying again")
                complete = False
            if complete:
                failures = 0
                if topology is self._membership.current and not self._needed.is_set():
                    self.passed_version = topology.version
                    self.passed.set()
            else:
                # A member down for long: a pass looks at every key, so try again less and less
                # often; a change of the members (or keys to pass on) cuts the wait short.
                failures += 1
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see liveness.wait_changed
                    async with asyncio.timeout(min(_RETRY * 2 ** (failures - 1), _MAX_RETRY)):
                        await self._needed.wait()
                self._needed.set()

    async def _pass(self, topology: Topology) -> bool:
        """Send every key this node holds but keeps no copy of to its copies (its owner, with
        --replicas 1); whether all were taken."""
        node_id = self._membership.node_id
        storage = self._storage
        outgoing: dict[str, list[tuple[tuple[str, ...], str, bytes]]] = {
            member: [] for member in topology.others(node_id)
        }
        # Members of the list before get the `done` too, keys or not: it tells them of this list
        # (a node taken off it that has not read it yet stops taking writes, see Cluster.heard_of).
        addresses = dict(topology.members)
        if self.previous is not None:
            for member, address in self.previous.others(node_id).items():
                if member not in outgoing:
                    outgoing[member] = []
                    addresses[member] = address
        previous = self.previous
        looked = 0
        leaving: list[tuple[tuple[tuple[str, ...], str, bytes], list[str]]] = []  # with their copies
        for path, node in list(storage.namespaces()):
            for key, stored in storage.entries(node):
                looked += 1
                if looked % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                    if topology is not self._membership.current:
                        return False  # the members changed again: start over with the new list
                copies = topology.copies(path, key)
                held = (path, key, stored)
                if node_id not in copies:
                    for copy in copies:
                        outgoing[copy].append(held)
                    leaving.append((held, copies))
                elif previous is not None and topology.replicas > 1:
                    # A copy here, and new copies elsewhere: they get it from every copy that has it.
                    before = previous.copies(path, key)
                    for copy in copies:
                        if copy != node_id and copy not in before:
                            outgoing[copy].append(held)
        moving = len(leaving)
        if moving:
            log.info("handing off %d keys to %s", moving, ", ".join(m for m, e in outgoing.items() if e))
        buried: dict[str, list[tuple[tuple[str, ...], str, bytes]]] = {member: [] for member in outgoing}
        emptied: list[tuple[tuple[str, ...], bytes]] = []
        if storage.tombstones is not None:  # a copy they cover may be on its owner, or come to it
            keys, emptied = storage.tombstones.versions()
            for path, key, version in keys:
                copies = topology.copies(path, key)
                if node_id not in copies:
                    for copy in copies:
                        buried[copy].append((path, key, version))
        complete = True
        results = await asyncio.gather(
            *(
                self._send(member, addresses[member], topology, entries, buried[member], emptied)
                for member, entries in outgoing.items()
            ),
            return_exceptions=True,
        )
        took = set()
        for member, result in zip(outgoing, results, strict=True):
            if isinstance(result, BaseException):
                if member in topology.members:  # one only told of the list may be gone for good
                    complete = False
                    log.info("hand-off to %s did not go through yet, trying again: %s", member, result)
                continue
            took.add(member)
        # A key goes once every copy took it (with replicas, a copy down keeps it here till it is back).
        dropped = sum(
            storage.delete_unchanged(path, key, stored)
            for (path, key, stored), copies in leaving
            if took.issuperset(copies)
        )
        self._commit()
        self.sent += dropped
        if moving and complete:
            log.info("hand-off of version %s done: %d keys moved", topology.version, moving)
        return complete

    async def _send(
        self,
        member: str,
        address: str,
        topology: Topology,
        entries: list[tuple[tuple[str, ...], str, bytes]],
        buried: list[tuple[tuple[str, ...], str, bytes]],
        emptied: list[tuple[tuple[str, ...], bytes]],
    ) -> peer_pb.HandOffResponse:
        """Send `entries` (stored forms), the tombstones `buried` and the `emptied` namespaces to
        `member`, then `done`."""
        requests = _messages(self._storage, topology.version, entries, buried, emptied, done=True)
        call: Callable[..., Awaitable[peer_pb.HandOffResponse]] = self._open_stream(address)
        try:
            response = await call(requests)
        except grpc.aio.AioRpcError as error:
            raise ConnectionError(f"{member}: {error.code().name}: {error.details()}") from None
        if member in topology.members:
            self.known.set()
        if response.passed_version == self._membership.current.version:
            # It holds nothing this node owns now (this node restarted, say): misses need not ask it.
            self._done_from[member] = response.passed_version
            self._reopen()
        return response


async def _messages(
    storage: NamespacedStorage,
    version: str,
    entries: list[tuple[tuple[str, ...], str, bytes]],
    buried: list[tuple[tuple[str, ...], str, bytes]],
    emptied: list[tuple[tuple[str, ...], bytes]],
    *,
    done: bool,
) -> AsyncIterator[peer_pb.HandOffRequest]:
    """HandOffRequests carrying `entries` (stored forms), the tombstones `buried` and the `emptied`
    namespaces, placed by the topology of `version`; the last one says `done` if asked to.

    Each message is closed once it carries MESSAGE_BYTES, whatever its entries' sizes or their
    number: a value larger than that goes alone, in a message within the receiver's limit
    (its max_value_bytes, with room for the key and path: nestkv.wire.channel).
    """
    request = peer_pb.HandOffRequest(topology_version=version)
    size = 0
    for path, change in emptied:
        request.emptied.add(path=path, version=change)
        size += _path_bytes(path) + _ITEM_BYTES
        if size >= MESSAGE_BYTES:
            yield request
            request, size = peer_pb.HandOffRequest(topology_version=version), 0
    for path, key, change in buried:
        request.tombstones.add(path=path, key=key, version=change)
        size += _path_bytes(path) + text_bytes(key) + _ITEM_BYTES
        if size >= MESSAGE_BYTES:
            yield request
            request, size = peer_pb.HandOffRequest(topology_version=version), 0
    for path, key, stored in entries:
        left = storage.time_left(stored)
        if left is None:
            continue  # expired on the way
        value = value_of(stored)
        weight = _path_bytes(path) + text_bytes(key) + len(value) + _ITEM_BYTES
        if size and size + weight > MESSAGE_BYTES:  # a large value opens a message of its own
            yield request
            request, size = peer_pb.HandOffRequest(topology_version=version), 0
        entry = request.entries.add(path=path, key=key, value=value, version=version_of(stored))
        if left != NEVER:
            entry.expires_in.FromNanoseconds(max(1_000_000, int(left * 1e9)))
        size += weight
        if size >= MESSAGE_BYTES:
            yield request
            request, size = peer_pb.HandOffRequest(topology_version=version), 0
    request.done = done
    yield request


def _path_bytes(path: Sequence[str]) -> int:
    """About what a path takes in a message (at least its segments' UTF-8 and their framing)."""
    return sum(text_bytes(segment) + 2 for segment in path)


def _deadline(copy: peer_pb.HandOffEntry | pb.GetResponse, now: float) -> float:
    """The deadline on this node's storage clock of a copy that says the time it has left."""
    return now + copy.expires_in.ToNanoseconds() / 1e9 if copy.HasField("expires_in") else NEVER
