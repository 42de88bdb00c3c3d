"""A single server's StoreServicer built in the test's process, as nestkv.server.app builds it."""

from __future__ import annotations

from collections.abc import Callable

from nestkv.server.batches import RESPONSE_CHUNK_BYTES
from nestkv.server.limits import Limits
from nestkv.server.metrics import OperationMetrics
from nestkv.server.operations import Operations
from nestkv.server.router import LocalRouter
from nestkv.server.service import StoreServicer
from nestkv.server.storage import NamespacedStorage


def local_servicer(
    storage: NamespacedStorage,
    limits: Limits | None = None,
    *,
    commit: Callable[[], None] | None = None,
    metrics: OperationMetrics | None = None,
    chunk_bytes: int = RESPONSE_CHUNK_BYTES,
) -> StoreServicer:
    """The servicer of a single server over `storage` (no persistence, no tokens)."""
    limits = limits or Limits()
    return StoreServicer(
        Operations(storage, limits),
        LocalRouter(),
        limits,
        commit=commit,
        metrics=metrics,
        chunk_bytes=chunk_bytes,
    )
