"""Lock: a lock held in a store, as redis-py's `Lock` is held in Redis.

    async with store.lock("report", expires_in=30, blocking_timeout=5):
        ...  # one holder at a time, as long as it finishes within expires_in

Acquiring stores a random token under the lock's key with set-if-absent and
an expiry; extending renews the expiry by compare-and-set while the token is
still there; releasing deletes the key only while it still holds the token.

When two holders can exist, all the same:
- the lock expired while its holder still ran (a pause, a slow call): the
  next caller takes it. Extend it in time, or choose `expires_in` well above
  the work's longest run;
- with --replicas 2 or more, a failover: a key's copies agree by last
  writer wins, not consensus, so a holder's write that reached one copy
  only, which is then lost or partitioned away, leaves the key free on the
  other.

For work that must never run twice, fence it: `Lock.version` is the version
the lock's key got when this holder took it, greater for every later holder
(compare versions as unsigned byte strings). Pass it to the resource the lock
guards, and have it refuse a version lower than the highest it has seen, or
guard the resource's own key with compare_and_set.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Self

from nestkv.wire.errors import StoreError

if TYPE_CHECKING:
    from nestkv.client.base import NamespacedStore


class LockError(Exception):
    """The lock was not acquired in time, or this holder no longer holds it (it expired)."""


class Lock:
    """A lock named `name` in a store (see the module). Not reentrant; one holder per Lock object."""

    __slots__ = ("_store", "blocking_timeout", "expires_in", "name", "sleep", "token", "version")

    def __init__(
        self,
        store: NamespacedStore,
        name: str,
        *,
        expires_in: float = 10.0,
        blocking_timeout: float | None = None,
        sleep: float = 0.1,
    ) -> None:
        """`expires_in`: seconds the lock is held unless extended or released (positive);
        `blocking_timeout`: seconds `acquire` tries for (None: until it gets the lock, 0: once);
        `sleep`: seconds between two tries."""
        if not expires_in > 0:
            raise ValueError(f"expires_in must be positive, got {expires_in!r}")
        if blocking_timeout is not None and not blocking_timeout >= 0:
            raise ValueError(f"blocking_timeout must be None or at least 0, got {blocking_timeout!r}")
        if not sleep > 0:
            raise ValueError(f"sleep must be positive, got {sleep!r}")
        self._store = store
        self.name = name
        self.expires_in = expires_in
        self.blocking_timeout = blocking_timeout
        self.sleep = sleep
        self.token: bytes | None = None
        """The random value this holder stored under the lock's key; None while not held."""
        self.version: bytes | None = None
        """The version the lock's key got when this holder acquired it: a fencing token."""

    async def acquire(self) -> bool:
        """Take the lock, trying every `sleep` seconds for up to `blocking_timeout`. Whether it
        was taken."""
        if self.token is not None:
            raise LockError(f"lock {self.name!r} is held by this Lock already (it is not reentrant)")
        loop = asyncio.get_running_loop()
        give_up = None if self.blocking_timeout is None else loop.time() + self.blocking_timeout
        token = secrets.token_hex(16).encode()
        while (version := await self._try(token)) is None:
            if give_up is not None and loop.time() + self.sleep > give_up:
                return False
            await asyncio.sleep(self.sleep)
        self.token, self.version = token, version
        return True

    async def _try(self, token: bytes) -> bytes | None:
        """One attempt to take the lock with `token`: the version it got, None if held by another."""
        try:
            return await self._store.set_versioned(
                self.name, token, timedelta(seconds=self.expires_in), if_absent=True
            )
        except StoreError as error:
            if error.applied is not None:
                raise  # certainly not taken
            # It may have been taken (the answer was lost): it was if the token is there.
            held = await self._store.get_with_version(self.name)
            if held is not None and held.value == token:
                return held.version
            raise

    async def extend(self, expires_in: float | None = None) -> None:
        """Hold the lock for `expires_in` seconds from now (default: the Lock's `expires_in`).
        Raises LockError if this holder no longer holds it. Unlike redis-py's `extend(t)`, which
        adds `t` to the time left, this sets the time left (redis-py's `reacquire()`, or
        `extend(t, replace_ttl=True)`)."""
        seconds = self.expires_in if expires_in is None else expires_in
        if not seconds > 0:
            raise ValueError(f"expires_in must be positive, got {seconds!r}")
        held = await self._store.get_with_version(self.name) if self.token is not None else None
        if held is None or held.value != self.token:
            raise LockError(f"lock {self.name!r} is not held by this holder: it cannot be extended")
        if not await self._store.compare_and_set(
            self.name, held.value, held.version, timedelta(seconds=seconds)
        ):
            raise LockError(f"lock {self.name!r} changed hands while it was being extended")

    async def release(self) -> None:
        """Let the lock go. Raises LockError if this holder no longer held it (it expired, and
        another may have taken it since)."""
        token, self.token, self.version = self.token, None, None
        if token is None or not await self._store.delete_if(self.name, value=token):
            raise LockError(f"lock {self.name!r} was not held by this holder when released (expired?)")

    async def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return await self._store.exists(self.name)

    async def owned(self) -> bool:
        """Whether this holder holds the lock (it has not expired)."""
        return self.token is not None and await self._store.get(self.name) == self.token

    async def __aenter__(self) -> Self:
        if not await self.acquire():
            raise LockError(f"lock {self.name!r} was not acquired within {self.blocking_timeout} s")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()
