"""Errors a request can cause, independent of the transport.

    StoreFault
     ├── InvalidArgument     a field is malformed or over a limit (also a ValueError)
     ├── StoreFull           a write would take memory over --max-memory and nothing may be evicted
     ├── QuotaExceeded       a write would take a namespace over its byte quota (a token's max_bytes)
     ├── StoreUnavailable    writes are refused for now: the log on disk cannot be written
     ├── Unauthenticated     --auth-file is set and the call has no token, or one the file does not hold
     ├── PermissionDenied    the caller's token does not allow the operation (a write with `read` access)
     └── NodeFault           another cluster node failed the operation, or could not be reached: its status

The servicer maps each class to a gRPC status code through one table
(`server.service.STATUS_OF`); a NodeFault carries the status another node (or
the forwarding to it, `server.cluster.peers.failure_of`) gave.
"""

from __future__ import annotations


class StoreFault(Exception):
    """Base of the errors a request can cause; the message is shown to the caller."""

    def confined(self) -> str:
        """The message for a caller confined to a namespace: nothing about the rest of the store."""
        return str(self)


class InvalidArgument(StoreFault, ValueError):
    """A request field is malformed or over a limit; nothing was changed."""


class StoreFull(StoreFault):
    """A write would exceed the memory bound and the eviction policy frees nothing; nothing was changed."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed

    def confined(self) -> str:
        # No figures: the memory the whole store uses is other tenants' business, and the bytes a
        # write needs, tried size after size, would tell how much is free.
        return "the store is full: nothing may be evicted to make room for this write"


class QuotaExceeded(StoreFault):
    """A write would take a namespace over its byte quota; nothing was changed."""

    def confined(self) -> str:
        # The quota may be on a namespace above the caller's root, whose figures are others'.
        return (
            "a byte quota over this namespace is reached (a token's max_bytes): "
            "delete keys under it to make room"
        )


class StoreUnavailable(StoreFault):
    """The server cannot take writes for now (its log cannot be written); reads still work."""


class Unauthenticated(StoreFault):
    """The call carries no token, or one the auth file does not hold; nothing was read or changed."""


class PermissionDenied(StoreFault):
    """The caller's token does not allow this operation; nothing was changed."""


class NodeFault(StoreFault):
    """Another node of the cluster failed the operation forwarded to it; `code` is its status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
