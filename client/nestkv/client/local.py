"""LocalStore: the Store API in process, on the server's own storage engine.

The reference implementation of the contract: the shared test suite runs
against it and against GrpcStore, and benchmarks use it as the in-process
baseline. It applies the server's limits, so it accepts and rejects what a
default server does.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Self, cast

from nestkv.client._arguments import (
    as_bytes,
    check_amount,
    check_key,
    check_segment,
    check_version,
    set_condition,
    span_seconds,
    whole_seconds,
)
from nestkv.client.base import NamespacedStore, Versioned
from nestkv.server.errors import meaning_of
from nestkv.server.limits import Limits
from nestkv.server.storage import NEVER, Clock, Condition, FailedPrecondition, NamespacedStorage
from nestkv.wire.errors import PreconditionFailedError

# Each write also reclaims up to this many expired entries, so memory is
# reclaimed without a background task.
_REAP_PER_WRITE = 4


class LocalStore(NamespacedStore):
    """An in-process NamespacedStore over a NamespacedStorage."""

    __slots__ = ("_limits", "_path", "_storage")

    def __init__(self, *, limits: Limits | None = None, clock: Clock | None = None) -> None:
        self._storage = NamespacedStorage() if clock is None else NamespacedStorage(clock)
        self._limits = limits or Limits()
        self._path: tuple[str, ...] = ()

    def with_namespace(self, namespace: str) -> Self:
        child = type(self).__new__(type(self))
        child._storage = self._storage
        child._limits = self._limits
        child._path = (*self._path, check_segment(namespace))
        self._limits.check_path(child._path)
        return child

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        ttl = span_seconds(expires_in, "expires_in")
        data = as_bytes(value)
        self._limits.check_key(check_key(key))
        self._limits.check_value(data)
        self._storage.set(self._path, key, data, ttl)
        self._storage.reap(_REAP_PER_WRITE)

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        renew = span_seconds(renew_for, "renew_for")
        self._limits.check_key(check_key(key))
        return self._storage.get(self._path, key, renew)

    async def delete(self, key: str) -> None:
        self._limits.check_key(check_key(key))
        self._storage.delete(self._path, key)

    async def delete_all(self) -> None:
        self._storage.delete_all(self._path)

    async def exists(self, key: str) -> bool:
        self._limits.check_key(check_key(key))
        return self._storage.exists(self._path, key)

    async def expires_in(self, key: str) -> int | None:
        self._limits.check_key(check_key(key))
        left = self._storage.expires_in(self._path, key)
        if left is None:
            return None
        return -1 if left == NEVER else whole_seconds(left)

    async def increment(self, key: str, amount: int = 1, expires_in: int | timedelta | None = None) -> int:
        ttl = span_seconds(expires_in, "expires_in")
        self._limits.check_key(check_key(key))
        check_amount(amount)
        try:
            total, _, _ = self._storage.increment(self._path, key, amount, ttl)
        except FailedPrecondition as fault:  # as GrpcStore raises it
            reason = meaning_of(fault).reason
            raise PreconditionFailedError(
                f"FAILED_PRECONDITION: {fault}", "FAILED_PRECONDITION", reason=reason, applied=False
            ) from None
        self._storage.reap(_REAP_PER_WRITE)
        return total

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
        condition, version = set_condition(if_absent, if_present, if_version)
        ttl = span_seconds(expires_in, "expires_in")
        data = as_bytes(value)
        self._limits.check_key(check_key(key))
        self._limits.check_value(data)
        storage = self._storage
        if condition == "always":
            stored: bytes | None = storage.set(self._path, key, data, ttl)
        else:
            stored = storage.set_if(self._path, key, data, ttl, cast(Condition, condition), version)
        storage.reap(_REAP_PER_WRITE)
        return stored

    async def get_with_version(self, key: str, renew_for: int | timedelta | None = None) -> Versioned | None:
        renew = span_seconds(renew_for, "renew_for")
        self._limits.check_key(check_key(key))
        entry = self._storage.get_entry(self._path, key, renew)
        return None if entry is None else Versioned(entry[0], entry[1])

    async def delete_if(
        self, key: str, *, version: bytes | None = None, value: str | bytes | None = None
    ) -> bool:
        self._limits.check_key(check_key(key))
        if (version is None) == (value is None):
            raise ValueError("delete_if takes exactly one of version and value")
        if version is not None:
            return self._storage.delete_if(self._path, key, version=check_version(version))
        assert value is not None
        return self._storage.delete_if(self._path, key, value=as_bytes(value))
