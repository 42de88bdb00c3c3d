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

What a failure means for a write: `StoreError.applied` is False when the
write is certain not to have been applied anywhere (the server refused it,
the client never reached a server, or a cluster said "not applied"): it may
be sent again as it is. None: it may have been applied or not (the
connection broke after it was sent, the deadline passed while it ran, or a
cluster stored it on fewer copies than it needed): read before you rely on
either, or send it again (every operation is idempotent: last writer wins).

Arguments the client can check itself (negative durations, empty namespaces,
wrong types) raise ValueError or TypeError before any I/O. Cancelling the
calling task raises asyncio.CancelledError, as usual.
"""

from __future__ import annotations

from typing import Any

from nestkv.wire.codes import name_of


class StoreError(Exception):
    """A store operation failed; `code` is the gRPC status name (e.g. "UNAVAILABLE"), `applied`
    False when it certainly changed nothing, None when that is unknown (see the module)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code
        self.applied = _applied(code, message)


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
# What says a call never reached a server (gRPC's own words), or a server that it ran nowhere.
_NEVER_RAN = ("not applied", "failed to connect to all addresses", "no room to send")


def _applied(code: str, message: str) -> bool | None:
    """False if an operation that failed so certainly changed nothing; None if it may have."""
    if code in _NOTHING_CHANGED:
        return False
    if "outcome is unknown" in message:
        return None
    if any(words in message for words in _NEVER_RAN):
        return False
    return None


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


def error_from_status(name: str, details: str) -> StoreError:
    """The StoreError for a status (by name) and its message: the one mapping from status codes."""
    kind = _ERROR_OF.get(name, StoreProtocolError)
    return kind(f"{name}: {details}", name)


def error_from_rpc(error: Any) -> StoreError:
    """The StoreError for a failed call (grpc.aio.AioRpcError)."""
    return error_from_status(error.code().name, error.details())


def error_from_code(number: int, details: str) -> StoreError:
    """The StoreError for an OperationError of a Pipeline batch (a status code's number)."""
    return error_from_status(name_of(number), details)
