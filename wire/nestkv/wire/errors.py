"""Errors a failed store operation raises on the calling side (GrpcStore, and a node forwarding).

No raw grpc exception escapes the client. Re-exported by nestkv.client.errors and nestkv.client.

    StoreError                      any failure of a store operation
     ├── InvalidRequestError        the server rejected the request (INVALID_ARGUMENT,
     │                              OUT_OF_RANGE), or the client a value over max_value_bytes
     │                              before sending it; also a ValueError. Nothing was changed.
     ├── PreconditionFailedError    the stored value does not allow the operation: an increment
     │                              of a value that is not an integer, or past the int64 range
     │                              (FAILED_PRECONDITION); also a ValueError. Nothing was changed.
     ├── StoreUnavailableError      the server could not be reached, after retries (UNAVAILABLE),
     │                              or dropped the call while shutting down (CANCELLED)
     ├── StoreTimeoutError          the call's deadline passed (DEADLINE_EXCEEDED); also a TimeoutError
     ├── StoreFullError             the server is out of a resource (RESOURCE_EXHAUSTED)
     ├── AuthenticationError        the server needs a token and got none, or one it does not
     │                              hold (UNAUTHENTICATED); nothing was read or changed
     ├── PermissionDeniedError      the token does not allow the operation, a write with a
     │                              `read` token (PERMISSION_DENIED); nothing was changed
     └── StoreProtocolError         any other status: a server or protocol fault

What a failure means, for a program: `StoreError.reason` is why it failed,
the name of an ErrorReason of store.proto without its prefix (e.g.
"QUOTA_EXCEEDED", "NOT_SERVING", "CONNECTION_LOST"); `StoreError.applied` is
False when the operation is certain not to have been applied anywhere (the
server refused it, the client never reached a server, or a cluster says so):
it may be sent again as it is, even an increment; None: it may have been
applied or not (the connection broke after it was sent, the deadline passed
while it ran, or a cluster stored it on fewer copies than it needed): read
before you rely on either. Both come from the server's fields
(OperationError.reason and .applied, or the google.rpc.ErrorInfo of a call's
status), or from what the client itself knows of its connection; never from
an error's words, which are for people and may change.

Arguments the client can check itself (negative durations, empty namespaces,
wrong types) raise ValueError or TypeError before any I/O. Cancelling the
calling task raises asyncio.CancelledError, as usual.
"""

from __future__ import annotations

from typing import Any

from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nestkv.v1 import store_pb2 as pb
from nestkv.wire.codes import name_of

DOMAIN = "nestkv"
"""google.rpc.ErrorInfo.domain of nestkv's errors."""
_DEFAULT: Any = object()


class StoreError(Exception):
    """A store operation failed; `code` is the gRPC status name (e.g. "UNAVAILABLE"), `reason`
    why (an ErrorReason's name without its prefix; "" from a server older than reasons),
    `applied` False when it certainly changed nothing, None when that is unknown (see the
    module)."""

    def __init__(
        self, message: str, code: str = "UNKNOWN", *, reason: str = "", applied: bool | None = _DEFAULT
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        if applied is _DEFAULT:  # nothing said: what the code tells
            applied = False if code in _NOTHING_CHANGED else None
        self.applied: bool | None = applied

    def outcome_unknown(self, why: str) -> StoreError:
        """This error for an operation sent before, on an attempt that failed otherwise: whatever
        this one says, that earlier attempt may have been applied (`why` says so to people)."""
        return type(self)(f"{self}; {why}", self.code, reason=self.reason, applied=None)


_NOTHING_CHANGED = frozenset(
    {
        "INVALID_ARGUMENT",
        "OUT_OF_RANGE",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
    }
)
"""Codes that say a call changed nothing, for a server that does not say it in its fields."""
_APPLIED_OF = {pb.APPLIED_NOT_APPLIED: False, pb.APPLIED_OUTCOME_UNKNOWN: None}


class InvalidRequestError(StoreError, ValueError):
    """The server rejected the request as invalid (a field malformed or over a limit)."""


class PreconditionFailedError(StoreError, ValueError):
    """The key's stored value does not allow the operation: an increment of a value that is not an
    integer in ASCII decimal, or one that would leave the signed 64-bit range."""


class StoreUnavailableError(StoreError):
    """The server could not be reached, even after retries, or dropped the call while shutting down.

    A call the server drops on shutdown (CANCELLED) was never handed to the
    store: it changed nothing. Cancelling your own task raises
    asyncio.CancelledError instead.
    """


class StoreTimeoutError(StoreError, TimeoutError):
    """The call did not complete before its deadline."""


class StoreFullError(StoreError):
    """The server refused the write for lack of a resource (memory, concurrency)."""


class AuthenticationError(StoreError):
    """The server requires a token and the call had none, or one the server does not hold (revoked)."""


class PermissionDeniedError(StoreError):
    """The caller's token does not allow this operation (a write with a `read` token)."""


class StoreProtocolError(StoreError):
    """The server failed or answered with a status the client does not expect."""


_ERROR_OF: dict[str, type[StoreError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "OUT_OF_RANGE": InvalidRequestError,
    "FAILED_PRECONDITION": PreconditionFailedError,
    "UNAVAILABLE": StoreUnavailableError,
    "CANCELLED": StoreUnavailableError,
    "DEADLINE_EXCEEDED": StoreTimeoutError,
    "RESOURCE_EXHAUSTED": StoreFullError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
}


def error_from_status(
    name: str, details: str, *, reason: str = "", applied: bool | None = _DEFAULT
) -> StoreError:
    """The StoreError for a status (by name), its message and what it says in its fields: the one
    mapping from status codes."""
    kind = _ERROR_OF.get(name, StoreProtocolError)
    return kind(f"{name}: {details}", name, reason=reason, applied=applied)


def error_from_rpc(error: Any) -> StoreError:
    """The StoreError for a failed call (grpc.aio.AioRpcError): its reason and whether it was
    applied from the google.rpc.ErrorInfo of its status, when the server sent one."""
    name, details = error.code().name, error.details()
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status detail that does not match the call's code: not nestkv's
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                applied = info.metadata.get("applied")
                return error_from_status(
                    name, details, reason=info.reason, applied=False if applied == "NOT_APPLIED" else None
                )
    return error_from_status(name, details)


def error_from_result(error: pb.OperationError) -> StoreError:
    """The StoreError for an OperationError of a Pipeline batch."""
    reason = pb.ErrorReason.Name(error.reason).removeprefix("ERROR_REASON_") if error.reason else ""
    applied = _APPLIED_OF.get(error.applied, _DEFAULT)
    return error_from_status(name_of(error.code), error.message, reason=reason, applied=applied)


def mark_outcome_unknown(error: pb.OperationError, why: str) -> None:
    """Say in OperationError `error` (one that says it was not applied, of an operation sent
    before on another attempt) that its outcome is unknown: that earlier attempt may have run.
    Its `applied` and its ErrorInfo's "applied" both change; `why` is added to its message."""
    if error.applied != pb.APPLIED_NOT_APPLIED:
        return
    error.applied = pb.APPLIED_OUTCOME_UNKNOWN
    error.message += f"; {why}"
    for detail in error.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            info.metadata["applied"] = "OUTCOME_UNKNOWN"
            detail.Pack(info)
