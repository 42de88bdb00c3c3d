"""The Store API (the one Litestar's stores implement): Store, NamespacedStore, StorageObject.

When Litestar is installed, `client/__init__.py` registers these ABCs as
virtual subclasses of Litestar's, so any store here passes
`isinstance(store, litestar.stores.base.NamespacedStore)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self

import msgspec


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
