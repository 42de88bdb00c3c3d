"""Faults on the wire: the one place a fault (nestkv.server.errors) becomes an OperationError, and
an OperationError a call's google.rpc.Status (gRPC's richer error model, in the
grpc-status-details-bin trailer), with the details its reason calls for."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from nestkv.server.errors import (
    Deferred,
    FailedPrecondition,
    InvalidArgument,
    KeyMoved,
    Meaning,
    QuotaExceeded,
    StoreFault,
    StoreFull,
    meaning_of,
)
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.codes import number_of
from nestkv.wire.errors import DOMAIN

APPLIED_OF = {False: pb.APPLIED_NOT_APPLIED, None: pb.APPLIED_OUTCOME_UNKNOWN}
"""Applied's value for a fault's `applied`."""


def put_error(error: Any, fault: StoreFault, *, confined: bool) -> None:
    """Write `fault` into an OperationError (`error`): its status, its message (`confined`: the one
    for a caller confined to a namespace), its reason, whether it was applied, its details, for a
    KeyMoved the node the key is on, and whether it was Deferred."""
    meaning = meaning_of(fault)
    error.code = number_of(meaning.code)
    error.message = fault.confined() if confined else str(fault)
    error.reason = pb.ErrorReason.Value(f"ERROR_REASON_{meaning.reason}")
    error.applied = APPLIED_OF[fault.applied]
    for detail in _details(fault, meaning, error.message):
        error.details.add().Pack(detail)
    if isinstance(fault, Deferred):
        error.deferred = True
    elif isinstance(fault, KeyMoved):
        error.moved_to.id = fault.member
        error.moved_to.address = fault.address


def _details(fault: StoreFault, meaning: Meaning, message: str) -> list[Any]:
    """The google.rpc details of `fault`: an ErrorInfo, then what its reason calls for."""
    info = error_details_pb2.ErrorInfo(reason=meaning.reason, domain=DOMAIN)
    info.metadata["applied"] = "NOT_APPLIED" if fault.applied is False else "OUTCOME_UNKNOWN"
    if fault.node:
        info.metadata["node"] = fault.node
    details: list[Any] = [info]
    if isinstance(fault, InvalidArgument):
        if fault.limit is not None:
            info.metadata["limit"] = str(fault.limit)
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=fault.field, description=message, reason=meaning.reason
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(fault, FailedPrecondition):
        failure = error_details_pb2.PreconditionFailure.Violation(
            type=meaning.reason, subject="value", description=message
        )
        details.append(error_details_pb2.PreconditionFailure(violations=[failure]))
    elif isinstance(fault, StoreFull | QuotaExceeded):
        subject = "namespace quota" if isinstance(fault, QuotaExceeded) else "max_memory"
        quota = error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)
        details.append(error_details_pb2.QuotaFailure(violations=[quota]))
    if meaning.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(meaning.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return details


def status_of_error(error: Any) -> Any:
    """The google.rpc.Status of a call that fails with OperationError `error` (a one-operation
    RPC's, or a fault written by `put_error` for a whole call)."""
    status = status_pb2.Status(code=error.code, message=error.message)
    status.details.extend(error.details)
    return status


def status_of_fault(fault: StoreFault, *, confined: bool) -> Any:
    """The google.rpc.Status of a call that fails with `fault`."""
    error = pb.OperationError()
    put_error(error, fault, confined=confined)
    return status_of_error(error)
