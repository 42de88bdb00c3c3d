"""Errors raised by GrpcStore: the StoreError tree of nestkv.wire.errors, which draws it."""

from __future__ import annotations

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
    "InvalidRequestError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "StoreError",
    "StoreFullError",
    "StoreProtocolError",
    "StoreTimeoutError",
    "StoreUnavailableError",
]
