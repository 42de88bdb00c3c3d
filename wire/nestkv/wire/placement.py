"""Placement: which member of a cluster owns a key. Pure; the server and the client share it.

The function (also specified in store.proto, with test vectors in
tests/placement_vectors.json), named `HASH_NAME`:

    encoding(path, key) = u32(len(path))
                          + for each segment: u32(len(utf8(segment))) + utf8(segment)
                          + u32(len(utf8(key))) + utf8(key)
    u32(n)              = n as 4 bytes, big-endian
    h64(data)           = the first 8 bytes of SHA-256(data), as a big-endian unsigned integer
    score(node)         = mix(h64(encoding(path, key)) XOR h64(utf8(node id)))
    mix(z)              = SplitMix64's finaliser, modulo 2**64:
                              z = (z XOR z >> 30) * 0xbf58476d1ce4e5b9
                              z = (z XOR z >> 27) * 0x94d049bb133111eb
                              z =  z XOR z >> 31
    owner(path, key)    = the member with the highest score; between equal scores, the
                          smallest id (by its UTF-8 bytes)
    copies(path, key, r) = the r members with the highest scores, in that order (the owner
                          first), ties as for the owner

Rendezvous (highest random weight) hashing: every member scores every key, so
adding a member moves only the keys the new member wins (about 1/N of them),
and removing one moves only its own. The encoding is length-prefixed, so the
same key in `["a", "b"]` and in `["a_b"]` hashes independently. The path is
the one the server stores, with a token's root in front (Topology gives a
client its root).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

HASH_NAME = "rendezvous-sha256-splitmix64"
"""The name Topology answers with: a client routes on its own only by a function it knows."""

_MASK = (1 << 64) - 1


def encode(path: Sequence[str], key: str) -> bytes:
    """The unambiguous encoding of (path, key) that is hashed."""
    parts = [len(path).to_bytes(4, "big")]
    for segment in path:
        data = segment.encode()
        parts += (len(data).to_bytes(4, "big"), data)
    data = key.encode()
    parts += (len(data).to_bytes(4, "big"), data)
    return b"".join(parts)


def h64(data: bytes) -> int:
    """The first 8 bytes of SHA-256(data), big-endian."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def key_hash(path: Sequence[str], key: str) -> int:
    return h64(encode(path, key))


def mix(z: int) -> int:
    """SplitMix64's finaliser: every bit of the result depends on every bit of `z`."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class Placement:
    """Owners of keys among a set of member ids."""

    __slots__ = ("_hashes", "members")

    def __init__(self, members: Iterable[str]) -> None:
        ids = sorted(set(members), key=str.encode)
        if not ids:
            raise ValueError("a cluster needs at least one member")
        self.members: tuple[str, ...] = tuple(ids)
        # Sorted by id: on equal scores the first seen, the smallest id, stays the owner.
        self._hashes = [(h64(member.encode()), member) for member in ids]

    def owner(self, path: Sequence[str], key: str) -> str:
        """The id of the member that owns `key` in the namespace `path`."""
        hashes = self._hashes
        if len(hashes) == 1:
            return hashes[0][1]
        z0 = key_hash(path, key)
        best, owner = -1, ""
        for node_hash, member in hashes:  # mix() inlined: this runs per operation and member
            z = z0 ^ node_hash
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
            z ^= z >> 31
            if z > best:
                best, owner = z, member
        return owner

    def ranked(self, path: Sequence[str], key: str) -> list[str]:
        """Every member, by its score for `key` in `path`, highest first (the owner first): the
        first R are the key's copies, the next ones its stand-ins."""
        z0 = key_hash(path, key)
        # Sorted by id first, and the sort is stable: of equal scores, the smaller id comes first.
        scored = [(mix(z0 ^ node_hash), member) for node_hash, member in self._hashes]
        scored.sort(key=lambda pair: pair[0], reverse=True)
        return [member for _, member in scored]


def topology_version(members: Mapping[str, str]) -> str:
    """A digest of a member list (ids and addresses), the same whatever order it was given in."""
    lines = "".join(f"{member}={members[member]}\n" for member in sorted(members, key=str.encode))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]
