"""What a program reads of a failure: an OperationError's or a call's status code, reason and
applied, and the details of gRPC's richer error model (google.rpc.Status)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.rpc import error_details_pb2

from nestkv.v1 import store_pb2 as pb
from nestkv.wire.codes import name_of


def fields_of(error: pb.OperationError) -> tuple[str, str, str]:
    """The status code, reason and applied of an OperationError, by their names."""
    return name_of(error.code), pb.ErrorReason.Name(error.reason), pb.Applied.Name(error.applied)


def detail_of(details: Iterable[Any], kind: Any) -> Any:
    """The detail of message type `kind` (ErrorInfo, BadRequest, ...) among packed `details`."""
    for detail in details:
        if detail.Is(kind.DESCRIPTOR):
            unpacked = kind()
            detail.Unpack(unpacked)
            return unpacked
    raise AssertionError(f"no {kind.DESCRIPTOR.full_name} among {list(details)}")


def info_of(details: Iterable[Any]) -> Any:
    """The google.rpc.ErrorInfo among packed `details`."""
    return detail_of(details, error_details_pb2.ErrorInfo)
