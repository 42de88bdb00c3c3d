"""The Store API (the one Litestar's stores implement): Store, NamespacedStore, StorageObject.

When Litestar is installed, `client/__init__.py` registers these ABCs as
virtual subclasses of Litestar's, so any store here passes
`isinstance(store, litestar.stores.base.NamespacedStore)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, Self

import msgspec

if TYPE_CHECKING:
    from nestkv.client.lock import Lock


class Store(ABC):
    """Thread and process safe asynchronous key/value store."""

    __slots__ = ()

    @abstractmethod
    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        """Set a value.

        Args:
            key: Key to associate the value with.
            value: Value to store; a str is stored as its UTF-8 encoding.
            expires_in: Time before the key expires: seconds (int, or float for
                sub-second spans) or a timedelta; None: never. Zero and negative
                spans raise ValueError (as Redis rejects them), before any I/O.
        """

    @abstractmethod
    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        """Get a value.

        Args:
            key: Key associated with the value.
            renew_for: If given and the key has an expiry, its expiry becomes
                now + renew_for, atomically with the read. A key stored without
                expiry stays without. Must be positive.

        Returns:
            The value if the key exists and has not expired, else None.
        """

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete a value. If no such key exists, this is a no-op."""

    @abstractmethod
    async def delete_all(self) -> None:
        """Delete all values of this store, its namespace and every namespace below it."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether `key` holds a value that has not expired."""

    @abstractmethod
    async def expires_in(self, key: str) -> int | None:
        """Seconds before `key` expires, rounded to the nearest whole second (as Redis's TTL).

        Returns None if the key does not exist (or has expired), -1 if it has no expiry.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        return None


class NamespacedStore(Store):
    """A Store offering hierarchical namespacing.

    Bulk actions (delete_all) on a namespace affect all namespaces below it;
    every other operation is isolated to its own namespace.
    """

    __slots__ = ()

    @abstractmethod
    def with_namespace(self, namespace: str) -> Self:
        """A new store one level down, in the child namespace `namespace` of this one.

        Raises ValueError if `namespace` is empty or over the segment size limit.
        """

    # Atomic operations: each is checked and applied in one step where the key lives, so callers
    # in any number of processes never race on a get-then-set. None of them is sent again by the
    # client after its outcome became unknown (see nestkv.wire.errors: `StoreError.applied`).

    @abstractmethod
    async def increment(self, key: str, amount: int = 1, expires_in: int | timedelta | None = None) -> int:
        """Add `amount` (a signed 64-bit int) to the integer stored under `key`, and return the sum.

        The value is stored as ASCII decimal (`get` returns b"42", as after
        Redis's INCR). A missing or expired key is created holding `amount`
        (0 included, as Redis's INCRBY key 0 does: `increment(key, 0)` reads
        a counter, creating it at 0), with `expires_in` as its expiry (a
        rate-limit window); an existing key
        keeps its expiry, or its lack of one. A value that is not such an
        integer, or a sum outside the signed 64-bit range, raises
        PreconditionFailedError and leaves the value as it was.
        """

    @abstractmethod
    async def set_versioned(
        self,
        key: str,
        value: str | bytes,
        expires_in: int | timedelta | None = None,
        *,
        if_absent: bool = False,
        if_present: bool = False,
        if_version: bytes | None = None,
    ) -> bytes | None:
        """`set` under at most one condition (as `set_if_absent`, `set_if_present`,
        `compare_and_set`): the new value's version if it was stored, None if the condition did
        not hold. The version is what a lock holder fences with (nestkv.client.lock)."""

    async def set_if_absent(
        self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
    ) -> bool:
        """Store `value` only if `key` holds no value (missing or expired), as SET NX.
        Whether it was stored."""
        return await self.set_versioned(key, value, expires_in, if_absent=True) is not None

    async def set_if_present(
        self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
    ) -> bool:
        """Store `value` only if `key` holds a value, as SET XX. Whether it was stored."""
        return await self.set_versioned(key, value, expires_in, if_present=True) is not None

    @abstractmethod
    async def get_with_version(self, key: str, renew_for: int | timedelta | None = None) -> Versioned | None:
        """`get`, with the value's version (see `compare_and_set`); None if the key is missing."""

    async def compare_and_set(
        self, key: str, value: str | bytes, version: bytes, expires_in: int | timedelta | None = None
    ) -> bool:
        """Store `value` only if `key` still holds the value of `version` (as `get_with_version`
        returned it): no write came in between. Whether it was stored (False: read and try again)."""
        return await self.set_versioned(key, value, expires_in, if_version=version) is not None

    @abstractmethod
    async def delete_if(
        self, key: str, *, version: bytes | None = None, value: str | bytes | None = None
    ) -> bool:
        """Delete `key` only if its value has `version`, or equals `value` (give exactly one).
        Whether it was deleted: a lock is released only while its holder still holds it."""

    def lock(
        self, name: str, expires_in: float = 10.0, blocking_timeout: float | None = None, sleep: float = 0.1
    ) -> Lock:
        """A lock named `name` in this store, as an async context manager (see nestkv.client.lock)."""
        from nestkv.client.lock import Lock  # lock.py builds on this module

        return Lock(self, name, expires_in=expires_in, blocking_timeout=blocking_timeout, sleep=sleep)


class Versioned(NamedTuple):
    """A value with its version: 16 bytes, compared as unsigned byte strings (the greater is newer)."""

    value: bytes
    version: bytes


class StorageObject(msgspec.Struct):
    """Serialized data alongside its expiry time (wall clock, UTC)."""

    expires_at: datetime | None
    data: bytes

    @classmethod
    def new(cls, data: bytes, expires_in: int | timedelta | None) -> StorageObject:
        """A StorageObject expiring `expires_in` (seconds or timedelta) from now; None: never."""
        if expires_in is None:
            return cls(expires_at=None, data=data)
        span = expires_in if isinstance(expires_in, timedelta) else timedelta(seconds=expires_in)
        return cls(expires_at=datetime.now(tz=UTC) + span, data=data)

    @property
    def expired(self) -> bool:
        """Whether the expiry time has been reached."""
        return self.expires_at is not None and datetime.now(tz=UTC) >= self.expires_at

    @property
    def expires_in(self) -> int:
        """Whole seconds left before expiry (0 once expired); -1 if no expiry time was set."""
        if self.expires_at is None:
            return -1
        return max(0, int((self.expires_at - datetime.now(tz=UTC)).total_seconds()))

    def to_bytes(self) -> bytes:
        """Encode to msgpack bytes."""
        return _ENCODER.encode(self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> StorageObject:
        """Decode bytes made by `to_bytes`."""
        return _DECODER.decode(raw)


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(StorageObject)


def _register_with_litestar() -> None:
    """Register Store and NamespacedStore as Litestar's, when Litestar is installed."""
    try:
        from litestar.stores import base as litestar_base
    except ImportError:  # Litestar is optional
        return
    # ABC.register takes abstract classes; mypy's type-abstract check is a false positive here.
    litestar_base.Store.register(Store)  # type: ignore[type-abstract]
    litestar_base.NamespacedStore.register(NamespacedStore)  # type: ignore[type-abstract]


_register_with_litestar()
