"""Async client of the nestkv store: the Store / NamespacedStore API over gRPC.

    >>> store = GrpcStore.with_client("127.0.0.1:50051")
    >>> sessions = store.with_namespace("sessions")
    >>> await sessions.set("id", b"data", expires_in=3600)

When Litestar is installed, the stores here are registered as Litestar
stores: `isinstance(store, litestar.stores.base.NamespacedStore)` holds.
"""

from __future__ import annotations

from nestkv.client.base import NamespacedStore, StorageObject, Store
from nestkv.client.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    StoreError,
    StoreFullError,
    StoreProtocolError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from nestkv.client.local import LocalStore
from nestkv.client.stats import NamespaceStats, NodeStats, Quota, ServerStats, Stats
from nestkv.client.store import GrpcStore, channel_options

__all__ = [
    "AuthenticationError",
    "GrpcStore",
    "InvalidRequestError",
    "LocalStore",
    "NamespaceStats",
    "NamespacedStore",
    "NodeStats",
    "Quota",
    "PermissionDeniedError",
    "ServerStats",
    "Stats",
    "StorageObject",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreProtocolError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "channel_options",
]


def _register_with_litestar() -> None:
    try:
        from litestar.stores import base as litestar_base
    except ImportError:  # Litestar is optional
        return
    # ABC.register takes abstract classes; mypy's type-abstract check is a false positive here.
    litestar_base.Store.register(Store)  # type: ignore[type-abstract]
    litestar_base.NamespacedStore.register(NamespacedStore)  # type: ignore[type-abstract]


_register_with_litestar()
