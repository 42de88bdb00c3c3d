"""What kind of operation a Pipeline Operation is, as both the client and the server need to know."""

from __future__ import annotations

from typing import Any

from nestkv.v1 import store_pb2 as pb


def conditional(kind: str, request: Any) -> bool:
    """Whether an operation of `kind` acts on the key's state when it runs: an increment, a set or
    a delete with a condition. Such an operation is not idempotent: run twice, it may count
    twice, or answer "not stored" for its own first change."""
    if kind == "increment":
        return True
    if kind == "set":
        return bool(request.condition)
    return kind == "delete" and request.HasField("condition")


def idempotent(operation: pb.Operation) -> bool:
    """Whether `operation` may be sent again after its outcome became unknown (see `conditional`)."""
    kind = operation.WhichOneof("operation")
    return kind is None or not conditional(kind, getattr(operation, kind))
