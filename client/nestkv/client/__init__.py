"""Async client of the nestkv store: the Store / NamespacedStore API over gRPC.

    >>> store = GrpcStore.with_client("127.0.0.1:50051")
    >>> sessions = store.with_namespace("sessions")
    >>> await sessions.set("id", b"data", expires_in=3600)

When Litestar is installed, the stores here are registered as Litestar
stores: `isinstance(store, litestar.stores.base.NamespacedStore)` holds
(nestkv.client.base).
"""

from __future__ import annotations

from nestkv.client.base import NamespacedStore, StorageObject, Store, Versioned
from nestkv.client.local import LocalStore
from nestkv.client.lock import Lock, LockError
from nestkv.client.stats import NamespaceStats, NodeStats, Quota, ServerStats, Stats
from nestkv.client.store import GrpcStore
from nestkv.wire.channel import channel_options
from nestkv.wire.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    PreconditionFailedError,
    StoreError,
    StoreFullError,
    StoreProtocolError,
    StoreTimeoutError,
    StoreUnavailableError,
)

__all__ = [
    "AuthenticationError",
    "GrpcStore",
    "InvalidRequestError",
    "LocalStore",
    "Lock",
    "LockError",
    "NamespaceStats",
    "NamespacedStore",
    "NodeStats",
    "Quota",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "ServerStats",
    "Stats",
    "StorageObject",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreProtocolError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "Versioned",
    "channel_options",
]
