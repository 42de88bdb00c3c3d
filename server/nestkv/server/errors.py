"""Errors a request can cause, independent of the transport, and the one table of what each means.

    StoreFault
     ├── InvalidArgument     a field is malformed or over a limit (also a ValueError)
     ├── FailedPrecondition  the stored value does not allow the operation
     │    └── IntegerOverflow   an increment would leave the signed 64-bit range
     ├── StoreFull           a write would take memory over --max-memory and nothing may be evicted
     ├── QuotaExceeded       a write would take a namespace over its byte quota (a token's max_bytes)
     ├── Deferred            a get was not run: its batch had read as much as one batch is answered with
     ├── StoreUnavailable    writes are refused for now: the log on disk cannot be written
     ├── DeadlineExceeded    the caller's deadline passed before the operation ran: not applied
     ├── Unauthenticated     --auth-file is set and the call's token is not one the file holds
     │    ├── TokenMissing      the call carries no token, or more than one
     │    └── NodesOnly         a call for the members of a cluster only, from a caller
     ├── PermissionDenied    the caller's token does not allow the operation (a write with `read` access)
     │    └── ReplicaRefused    a `replica` operation from a caller
     ├── KeyMoved            a peer forwarded a key this node's member list gives to another node
     ├── Unreachable         the node that answers for the key could not be reached, or did not answer
     ├── NoServingCopy       no copy of the key is up and current
     ├── NotServing          this node does not answer for the key now (catching up, stopping, ...)
     ├── TooFewCopies        fewer nodes are up than a write needs copies: not applied
     ├── ReplicationIncomplete  a write ran here but reached fewer copies than it needs
     ├── MembersChanging     the nodes' member lists disagree while a change spreads
     └── NodeFault           another node's error, passed on as it came (its code, reason, applied)

Faults are raised where they happen, by what happened; `FAULTS` below is the
one table giving each its status code, its reason (an ErrorReason of
store.proto, by name) and whether it may have been applied. Pure Python, no
gRPC and no protobuf: the storage raises these too. nestkv.server.status
writes them on the wire (OperationError, google.rpc.Status).
"""

from __future__ import annotations

from typing import Any, NamedTuple

_UNSET: Any = object()


class StoreFault(Exception):
    """Base of the errors a request can cause; the message is shown to the caller.

    What a fault means (its status code, reason, whether it was applied) is `FAULTS`'; a fault
    that knows better whether it was applied says so (`applied`: False, not applied; None, its
    outcome is unknown). `node` names the node that failed, where one did.
    """

    def __init__(self, message: str, *, applied: bool | None = _UNSET, node: str = "") -> None:
        super().__init__(message)
        self.applied: bool | None = meaning_of(self).applied if applied is _UNSET else applied
        self.node = node

    def confined(self) -> str:
        """The message for a caller confined to a namespace: nothing about the rest of the store."""
        return str(self)


class InvalidArgument(StoreFault, ValueError):
    """A request field is malformed or over a limit; nothing was changed."""

    def __init__(self, message: str, field: str = "", limit: int | None = None) -> None:
        """`field`: the request field at fault ("key", "value", "path", "expires_in", ...);
        `limit`: the limit it went over, if that is what was wrong."""
        super().__init__(message)
        self.field = field
        self.limit = limit


class FailedPrecondition(StoreFault):
    """The key's stored value does not allow the operation (an increment of a value that is not an
    integer); nothing was changed."""


class IntegerOverflow(FailedPrecondition):
    """An increment would take the value outside the signed 64-bit range; nothing was changed."""


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
    """The call carries a token the auth file does not hold; nothing was read or changed."""


class TokenMissing(Unauthenticated):
    """The server requires a token and the call carries none (or more than one)."""


class NodesOnly(Unauthenticated):
    """A call only the members of a cluster may make, from a caller that is not one."""


class PermissionDenied(StoreFault):
    """The caller's token does not allow this operation; nothing was changed."""


class ReplicaRefused(PermissionDenied):
    """A `replica` operation (a copy merged as given) from a caller: for the members only."""


class KeyMoved(StoreFault):
    """A peer forwarded an operation on a key that this node's member list gives to `member`:
    the peer sends it there (its list and ours disagree while a change spreads)."""

    def __init__(self, member: str, address: str) -> None:
        super().__init__(f"this node's member list gives the key to {member}", node=member)
        self.member = member
        self.address = address


class Unreachable(StoreFault):
    """The node that answers for the key (`node`) could not be reached, or did not answer in
    time: not applied if the operation never reached it, else its outcome is unknown."""


class NoServingCopy(StoreFault):
    """No copy of the key is up and current: not applied."""


class NotServing(StoreFault):
    """This node does not answer for the key now (it is catching up or stopping, or another copy
    does that it cannot reach, or the key's previous owner did not answer): not applied."""


class TooFewCopies(StoreFault):
    """Fewer nodes are up than a write needs copies (--min-copies): not applied."""


class ReplicationIncomplete(StoreFault):
    """A write ran here but reached fewer copies than it needs: its outcome is unknown."""


class MembersChanging(StoreFault):
    """The nodes' member lists disagree while a change spreads: not applied."""


class NodeFault(StoreFault):
    """Another node's error, passed on as it came: its status `code` (a name), `reason` (an
    ErrorReason's name without its prefix) and whether it was applied."""

    def __init__(self, code: str, reason: str, message: str, *, applied: bool | None, node: str) -> None:
        super().__init__(message, applied=applied, node=node)
        self.code = code
        self.reason = reason


class Meaning(NamedTuple):
    """What a fault means to the caller."""

    code: str
    """The gRPC status code's name."""
    reason: str
    """The ErrorReason's name without its "ERROR_REASON_" prefix (ErrorInfo.reason)."""
    applied: bool | None
    """False: it certainly changed nothing; None: its outcome is unknown (unless the fault says)."""
    retry_after: float | None = None
    """Seconds after which sending it again may succeed (RetryInfo); None: retrying does not help."""


FAULTS: dict[type[StoreFault], Meaning] = {
    InvalidArgument: Meaning("INVALID_ARGUMENT", "INVALID_FIELD", False),
    FailedPrecondition: Meaning("FAILED_PRECONDITION", "NOT_AN_INTEGER", False),
    IntegerOverflow: Meaning("FAILED_PRECONDITION", "INTEGER_OVERFLOW", False),
    StoreFull: Meaning("RESOURCE_EXHAUSTED", "STORE_FULL", False),
    QuotaExceeded: Meaning("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", False),
    Deferred: Meaning("RESOURCE_EXHAUSTED", "ANSWER_DEFERRED", False, 0.0),
    StoreUnavailable: Meaning("UNAVAILABLE", "LOG_UNWRITABLE", False, 1.0),
    DeadlineExceeded: Meaning("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", False),
    Unauthenticated: Meaning("UNAUTHENTICATED", "TOKEN_INVALID", False),
    TokenMissing: Meaning("UNAUTHENTICATED", "TOKEN_MISSING", False),
    NodesOnly: Meaning("UNAUTHENTICATED", "NODES_ONLY", False),
    PermissionDenied: Meaning("PERMISSION_DENIED", "ACCESS_DENIED", False),
    ReplicaRefused: Meaning("PERMISSION_DENIED", "NODES_ONLY", False),
    KeyMoved: Meaning("ABORTED", "KEY_MOVED", False),
    Unreachable: Meaning("UNAVAILABLE", "UNREACHABLE", None, 0.2),
    NoServingCopy: Meaning("UNAVAILABLE", "NO_SERVING_COPY", False, 0.5),
    NotServing: Meaning("UNAVAILABLE", "NOT_SERVING", False, 0.1),
    TooFewCopies: Meaning("UNAVAILABLE", "TOO_FEW_COPIES", False, 0.5),
    ReplicationIncomplete: Meaning("UNAVAILABLE", "REPLICATION_INCOMPLETE", None),
    MembersChanging: Meaning("UNAVAILABLE", "MEMBERS_CHANGING", False, 0.1),
    StoreFault: Meaning("UNKNOWN", "INTERNAL", None),
}
"""The one table: each fault's status code, reason and whether it was applied (a NodeFault's are
those it came with)."""


def meaning_of(fault: StoreFault) -> Meaning:
    """What `fault` means: its kind's entry in FAULTS (a NodeFault's own code and reason)."""
    if isinstance(fault, NodeFault):
        return Meaning(fault.code, fault.reason, fault.applied)
    return next(FAULTS[kind] for kind in type(fault).__mro__ if kind in FAULTS)


def status_of(fault: StoreFault) -> str:
    """The name of the status code that `fault` answers with."""
    return meaning_of(fault).code
