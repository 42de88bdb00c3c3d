"""The nestkv server: namespaced in-memory storage served over gRPC (`python -m nestkv.server`)."""

from __future__ import annotations

from nestkv.server.version import VERSION

__all__ = ["VERSION"]
