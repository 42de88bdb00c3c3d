"""Errors a request can cause, independent of the transport.

    StoreFault
     ├── InvalidArgument     a field is malformed or over a limit (also a ValueError)
 ├── FailedPrecondition  the stored value does not allow the operation (an increment of a non-integer)
     ├── StoreFull           a write would take memory over --max-memory and nothing may be evicted
     ├── QuotaExceeded       a write would take a namespace over its byte quota (a token's max_bytes)
     ├── Deferred            a get was not run: its batch had read as much as one batch is answered with
     ├── StoreUnavailable    writes are refused for now: the log on disk cannot be written
     ├── DeadlineExceeded    the caller's deadline passed before the operation ran: not applied
     ├── Unauthenticated     --auth-file is set and the call has no token, or one the file does not hold
     ├── PermissionDenied    the caller's token does not allow the operation (a write with `read` access)
     ├── KeyMoved            a peer forwarded a key this node's member list gives to another node
     └── NodeFault           another cluster node failed the operation, or could not be reached: its status

Faults are raised where they happen; `STATUS_OF` below is the one table
turning them into status names (a NodeFault carries the status another node,
or the forwarding to it, gave), and `put_error` the one place that writes one
into an OperationError. Names and numbers: nestkv.wire.codes. Nothing here
imports grpc: the storage raises these too.
"""

from __future__ import annotations

from typing import Any

from nestkv.wire.codes import number_of


class StoreFault(Exception):
    """Base of the errors a request can cause; the message is shown to the caller."""

    def confined(self) -> str:
        """The message for a caller confined to a namespace: nothing about the rest of the store."""
        return str(self)


class InvalidArgument(StoreFault, ValueError):
    """A request field is malformed or over a limit; nothing was changed."""


class FailedPrecondition(StoreFault):
    """The key's stored value does not allow the operation (an increment of a value that is not an
    integer, or past the int64 range); nothing was changed."""


class StoreFull(StoreFault):
    """A write would exceed the memory bound and the eviction policy frees nothing; nothing was changed."""

    def __init__(self, message: str, needed: int, cause: str = "") -> None:
        """`cause`: what made the change need memory, when it is not a write (said to every caller)."""
        super().__init__(f"{cause}: {message}" if cause else message)
        self.needed = needed
        self.cause = cause

    def confined(self) -> str:
        # No figures: the memory the whole store uses is other tenants' business, and the bytes a
        # write needs, tried size after size, would tell how much is free.
        full = "the store is full: nothing may be evicted to make room for this write"
        return f"{self.cause}: {full}" if self.cause else full


class QuotaExceeded(StoreFault):
    """A write would take a namespace over its byte quota; nothing was changed."""

    def __init__(self, message: str, cause: str = "") -> None:
        """`cause`: what made the change need room, when it is not a write (said to every caller)."""
        super().__init__(f"{cause}: {message}" if cause else message)
        self.cause = cause

    def confined(self) -> str:
        # The quota may be on a namespace above the caller's root, whose figures are others'.
        reached = (
            "a byte quota over this namespace is reached (a token's max_bytes): "
            "delete keys under it to make room"
        )
        return f"{self.cause}: {reached}" if self.cause else reached


class Deferred(StoreFault):
    """A get was not run: its batch's answer reached its bound (nestkv.server.batches.ANSWER_BYTES);
    sent again, it runs."""


class StoreUnavailable(StoreFault):
    """The server cannot take writes for now (its log cannot be written); reads still work."""


class DeadlineExceeded(StoreFault):
    """The caller's deadline passed before the operation ran: it was not applied."""


class Unauthenticated(StoreFault):
    """The call carries no token, or one the auth file does not hold; nothing was read or changed."""


class PermissionDenied(StoreFault):
    """The caller's token does not allow this operation; nothing was changed."""


class KeyMoved(StoreFault):
    """A peer forwarded an operation on a key that this node's member list gives to `member`:
    the peer sends it there (its list and ours disagree while a change spreads)."""

    def __init__(self, member: str, address: str) -> None:
        super().__init__(f"this node's member list gives the key to {member}")
        self.member = member
        self.address = address


class NodeFault(StoreFault):
    """Another node of the cluster failed the operation forwarded to it; `code` is its status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


STATUS_OF: dict[type[StoreFault], str] = {
    InvalidArgument: "INVALID_ARGUMENT",
    FailedPrecondition: "FAILED_PRECONDITION",
    StoreFull: "RESOURCE_EXHAUSTED",
    QuotaExceeded: "RESOURCE_EXHAUSTED",
    Deferred: "RESOURCE_EXHAUSTED",
    StoreUnavailable: "UNAVAILABLE",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
    KeyMoved: "ABORTED",
    StoreFault: "UNKNOWN",
}
"""The status of each fault, by name (a NodeFault's is its `code`)."""


def status_of(fault: StoreFault) -> str:
    """The name of the status code that `fault` answers with."""
    if isinstance(fault, NodeFault):
        return fault.code
    return next(STATUS_OF[kind] for kind in type(fault).__mro__ if kind in STATUS_OF)


def put_error(error: Any, fault: StoreFault, *, confined: bool) -> None:
    """Write `fault` into an OperationError (`error`): its status, its message (`confined`: the one
    for a caller confined to a namespace), for a KeyMoved the node the key is on, and whether it
    was Deferred."""
    error.code = number_of(status_of(fault))
    error.message = fault.confined() if confined else str(fault)
    if isinstance(fault, Deferred):
        error.deferred = True
    elif isinstance(fault, KeyMoved):
        error.moved_to.id = fault.member
        error.moved_to.address = fault.address
