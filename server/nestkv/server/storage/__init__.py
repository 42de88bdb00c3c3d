"""The storage engine: namespace tree plus expiry, in pure Python.

Nothing here knows about gRPC; the servicer validates requests and calls in.
"""

from __future__ import annotations

from nestkv.server.errors import FailedPrecondition
from nestkv.server.storage.engine import INT64_MAX, INT64_MIN, NEVER, Clock, Condition, NamespacedStorage

# FailedPrecondition: what `increment` raises, for LocalStore, which may use the storage alone.
__all__ = ["INT64_MAX", "INT64_MIN", "NEVER", "Clock", "Condition", "FailedPrecondition", "NamespacedStorage"]
