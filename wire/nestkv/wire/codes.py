"""gRPC status codes by number and by name: the one map between the two.

An OperationError of a Pipeline batch carries its status as a number; a call's status,
a StoreError's `code` and the server's error table use names. The numbers are gRPC's
(https://grpc.github.io/grpc/core/md_doc_statuscodes.html) and never change.
"""

from __future__ import annotations

NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
"""The name of each status code, at its number."""

_NUMBERS = {name: number for number, name in enumerate(NAMES)}


def name_of(number: int) -> str:
    """The name of status code `number`; UNKNOWN for a number gRPC does not define."""
    return NAMES[number] if 0 <= number < len(NAMES) else "UNKNOWN"


def number_of(name: str) -> int:
    """The number of the status code named `name`; UNKNOWN's for a name gRPC does not define."""
    return _NUMBERS.get(name, 2)
