"""Versions: every change is stamped by a hybrid logical clock where it runs.

A version is 16 bytes, big-endian, so that comparing two as byte strings
orders them:

    bytes 0-7    the clock: Unix milliseconds << 16 | a logical counter
    bytes 8-15   the node that stamped it (BLAKE2b of its id, 8-byte digest): the tie-break

The clock (CockroachDB's `util/hlc`, simplified) never goes behind the wall
clock, nor behind any version stamped or received here: each stamp is the
greater of the wall clock and the last stamp plus one, so a wall clock set
back, or a peer's clock ahead, makes the counter run instead. Across a
restart it never goes backwards either: it starts above the highest version
loaded from the data directory and above the bound it persisted there
(`persist` is called whenever a stamp passes the last bound, and raises it a
few seconds ahead, so the file is written every few seconds at most).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable

VERSION_BYTES = 16
LEGACY = bytes(VERSION_BYTES)
"""The version of data written before versions existed: older than any stamped change."""

log = logging.getLogger("nestkv.server")

_VERSION = struct.Struct(">QQ")
_pack_version = struct.Struct(">Q8s").pack
_LOGICAL_BITS = 16
MAX_AHEAD = 10_000 << _LOGICAL_BITS
"""How far ahead of this node's wall clock a received version may be before it is reported:
10 s. It is taken all the same (refusing it would stop hand-offs), so every later stamp here is
ahead of the wall clock too, until the wall clock catches up."""
MAX_PEER_AHEAD = 60.0
"""Seconds ahead of this node's wall clock past which a version another node sends is refused
(`HybridClock.ahead`): its clock is wrong, and taking it would put every later change here ahead
of every other node's for as long (a version of all ones would end this clock's range)."""
BOUND_AHEAD = 10_000 << _LOGICAL_BITS
"""How far ahead of a stamp the persisted bound is raised: 10 s of clock."""


def node_tag(node_id: str) -> int:
    """The tie-break of the versions a node stamps."""
    return int.from_bytes(hashlib.blake2b(node_id.encode(), digest_size=8).digest(), "big")


def clock_of(version: bytes) -> int:
    """The clock part of a version (Unix ms << 16 | counter)."""
    return int.from_bytes(version[:8], "big")


def seconds_of(stamp: int) -> float:
    """The Unix time, in seconds, of a clock reading (the first half of a version, or a bound)."""
    return (stamp >> _LOGICAL_BITS) / 1000


def milliseconds_of(version: bytes) -> int:
    """The Unix milliseconds when a version was stamped (by the stamping node's clock)."""
    return clock_of(version) >> _LOGICAL_BITS


def describe(version: bytes) -> str:
    """A version as people read it: `ms.counter@node`."""
    stamp, node = _VERSION.unpack(version)
    return f"{stamp >> _LOGICAL_BITS}.{stamp & 0xFFFF}@{node:016x}"


class HybridClock:
    """Stamps the versions of one node's changes (see the module's docstring)."""

    __slots__ = ("_bound", "_last", "_node", "_persist", "_tag", "_wall", "_warned")

    def __init__(
        self,
        node_id: str = "",
        wall: Callable[[], float] = time.time,
        *,
        persist: Callable[[int], None] | None = None,
    ) -> None:
        """`wall`: the wall clock in seconds (injectable for tests); `persist(bound)`, if given,
        durably records that no stamp will reach `bound` before the next call."""
        self._wall = wall
        self._node = node_tag(node_id)
        self._tag = self._node.to_bytes(8, "big")
        self._warned = 0.0
        self._last = 0
        self._persist = persist
        self._bound = 0 if persist is not None else 1 << 64

    def now(self) -> bytes:
        """A new version: later than every version stamped or observed here."""
        # On every write: kept to a few local operations.
        stamp = int(self._wall() * 1000) << _LOGICAL_BITS
        last = self._last
        if stamp <= last:
            stamp = last + 1
        self._last = stamp
        if stamp >= self._bound:
            self._raise_bound(stamp)
        return _pack_version(stamp, self._tag)

    def observe(self, version: bytes) -> None:
        """A version stamped elsewhere (or loaded): stamps from now on are later than it."""
        stamp = clock_of(version)
        if stamp > self._last:
            self._last = stamp
            wall = self._wall()
            if stamp - (int(wall * 1000) << _LOGICAL_BITS) > MAX_AHEAD and wall - self._warned > 60:
                self._warned = wall
                log.warning(
                    "took in a version %s, more than 10 s ahead of this node's clock: is a node's "
                    "clock ahead? Changes made here are stamped after it until this clock catches up",
                    describe(version),
                )

    def ahead(self, version: bytes) -> float:
        """Seconds `version` is ahead of this node's wall clock (negative: behind it)."""
        return milliseconds_of(version) / 1000 - self._wall()

    def start_above(self, bound: int) -> None:
        """Start above a bound persisted before a restart (see `persist`)."""
        self._last = max(self._last, bound)

    def persist_with(self, persist: Callable[[int], None]) -> None:
        """From now on, persist a bound ahead of every stamp with `persist` (see __init__)."""
        self._persist = persist
        self._bound = 0

    def keep_bound(self) -> None:
        """Persist a bound ahead of the wall clock now, even with no change to stamp: the bound then
        tells, after a restart, until when this node was running."""
        self._raise_bound(max(self._last, int(self._wall() * 1000) << _LOGICAL_BITS))

    def _raise_bound(self, stamp: int) -> None:
        if self._persist is not None:
            self._bound = stamp + BOUND_AHEAD
            self._persist(self._bound)
