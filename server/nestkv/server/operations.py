"""The Store API's operations run on this node's storage: each request checked, then applied.

Routing has decided, before anything here runs, that the key is this node's
(nestkv.server.cluster.router); scoping has put the caller's root in the path
(nestkv.server.security). What is left is the limits of each field, and the
call into nestkv.server.storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from google.protobuf.duration_pb2 import Duration

from nestkv.server.errors import InvalidArgument, StoreFault
from nestkv.server.limits import Limits, check_span
from nestkv.server.status import put_error
from nestkv.server.storage import NEVER, Condition, NamespacedStorage
from nestkv.server.storage.clock import MAX_PEER_AHEAD, describe
from nestkv.server.version import VERSION
from nestkv.v1 import store_pb2 as pb

Operation = Callable[[Any, Any], None]
"""Runs one request, filling the response message it is given; raises StoreFault."""

KINDS = tuple(field.name for field in pb.Operation.DESCRIPTOR.oneofs_by_name["operation"].fields)
"""The operations a Pipeline batch may hold: the names of Operation's oneof."""

READS = frozenset({"get", "exists", "expires_in"})

_CONDITION_OF: dict[int, Condition] = {
    pb.SET_CONDITION_IF_ABSENT: "absent",
    pb.SET_CONDITION_IF_PRESENT: "present",
    pb.SET_CONDITION_IF_VERSION: "version",
}
_VERSION_BYTES = 16


def changed(kind: str, request: Any, response: Any) -> bool:
    """Whether a write changed its key (or may have, for its tombstone): not a set or delete whose
    condition did not hold."""
    if kind == "set":
        return bool(response.stored)
    return kind != "delete" or not request.HasField("condition") or bool(response.deleted)


def _span(duration: Duration, name: str) -> float:
    """Seconds of a Duration given for expiry or renewal, checked to be valid and positive."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument(f"{name} is not a valid Duration (seconds={seconds}, nanos={nanos})", name)
    return check_span(seconds + nanos / 1e9, name)


def found(kind: str, response: Any) -> bool:
    """Whether the response of a read found its key."""
    return bool(response.exists) if kind == "exists" else bool(response.found)


class Operations:
    """The operations of one node's storage, by kind (`by_kind`), and its Stats."""

    def __init__(
        self, storage: NamespacedStorage, limits: Limits, writable: Callable[[], None] | None = None
    ) -> None:
        """`writable`, if given, runs before each write, raising StoreUnavailable when writes
        cannot be kept (persistence)."""
        self._storage = storage
        self._limits = limits
        self._writable = writable or unlogged
        self._started = time.monotonic()
        self.by_kind: dict[str, Operation] = {
            "set": self.set,
            "get": self.get,
            "delete": self.delete,
            "delete_all": self.delete_all,
            "exists": self.exists,
            "expires_in": self.expires_in,
            "replica": self.replica,
            "increment": self.increment,
        }

    def result_of(self, operation: pb.Operation) -> pb.OperationResult:
        """The result of running `operation` here, now (a fault in it with a confined message)."""
        result = pb.OperationResult()
        kind = operation.WhichOneof("operation")
        assert kind is not None
        out = getattr(result, kind)
        out.SetInParent()
        try:
            self.by_kind[kind](getattr(operation, kind), out)
        except StoreFault as fault:
            put_error(result.error, fault, confined=True)
        return result

    def set(self, request: pb.SetRequest, response: pb.SetResponse) -> None:
        limits = self._limits
        limits.check_key(request.key)
        limits.check_value(request.value)
        ttl = _span(request.expires_in, "expires_in") if request.HasField("expires_in") else None
        condition = request.condition
        if condition not in _CONDITION_OF and condition != pb.SET_CONDITION_ALWAYS:
            raise InvalidArgument(
                f"condition is {condition}, not a SetCondition this server knows", "condition"
            )
        if (condition == pb.SET_CONDITION_IF_VERSION) != bool(request.if_version):
            raise InvalidArgument(
                "if_version is given if and only if condition is SET_CONDITION_IF_VERSION", "if_version"
            )
        if condition == pb.SET_CONDITION_IF_VERSION:
            _check_version(request.if_version, "if_version")
        self._writable()
        storage = self._storage
        if condition:
            version = storage.set_if(
                request.path, request.key, request.value, ttl, _CONDITION_OF[condition], request.if_version
            )
        else:
            version = storage.set(request.path, request.key, request.value, ttl)
        if version is not None:
            response.stored = True
            response.version = version

    def get(self, request: pb.GetRequest, response: pb.GetResponse) -> None:
        self._limits.check_key(request.key)
        renew_for = _span(request.renew_for, "renew_for") if request.HasField("renew_for") else None
        if renew_for is not None:
            self._writable()
        if request.with_version:
            self._get_with_version(request, response, renew_for)
            return
        value = self._storage.get(request.path, request.key, renew_for)
        if value is not None:
            response.found = True
            response.value = value

    def _get_with_version(
        self, request: pb.GetRequest, response: pb.GetResponse, renew_for: float | None
    ) -> None:
        entry = self._storage.get_entry(request.path, request.key, renew_for)
        if entry is None:
            return
        response.found = True
        response.value, response.version, left = entry
        if left != NEVER:
            _put_span(response.expires_in, left)

    def delete(self, request: pb.DeleteRequest, response: pb.DeleteResponse) -> None:
        self._limits.check_key(request.key)
        condition = request.WhichOneof("condition")
        if condition == "if_version":
            _check_version(request.if_version, "if_version")
        self._writable()
        storage = self._storage
        if condition is None:
            response.deleted = storage.delete(request.path, request.key)
        elif condition == "if_version":
            response.deleted = storage.delete_if(request.path, request.key, version=request.if_version)
        else:
            response.deleted = storage.delete_if(request.path, request.key, value=request.if_value)

    def increment(self, request: pb.IncrementRequest, response: pb.IncrementResponse) -> None:
        self._limits.check_key(request.key)
        ttl = _span(request.expires_in, "expires_in") if request.HasField("expires_in") else None
        self._writable()
        storage = self._storage
        response.value, response.version, deadline = storage.increment(
            request.path, request.key, request.amount, ttl
        )
        if deadline != NEVER:
            _put_span(response.expires_in, max(deadline - storage.now(), 0.001))

    def delete_all(self, request: pb.DeleteAllRequest, response: pb.DeleteAllResponse) -> None:
        self._writable()
        self._storage.delete_all(request.path)

    def exists(self, request: pb.ExistsRequest, response: pb.ExistsResponse) -> None:
        self._limits.check_key(request.key)
        response.exists = self._storage.exists(request.path, request.key)

    def expires_in(self, request: pb.ExpiresInRequest, response: pb.ExpiresInResponse) -> None:
        self._limits.check_key(request.key)
        left = self._storage.expires_in(request.path, request.key)
        if left is None:
            return
        response.found = True
        if left != NEVER:
            _put_span(response.expires_in, left)

    def replica(self, request: pb.ReplicaRequest, response: pb.ReplicaResponse) -> None:
        """Merge a copy of a key's latest change made on another node (a peer's only), unless its
        version is from a clock far ahead of this one's."""
        _check_version(request.version, "version")
        storage = self._storage
        ahead = storage.versions.ahead(request.version)
        if ahead > MAX_PEER_AHEAD:
            raise InvalidArgument(
                f"the replica's version {describe(request.version)} is {ahead:.0f} s ahead of this node's "
                f"clock, more than the {MAX_PEER_AHEAD:g} s allowed: is the sending node's clock set right?",
                "version",
            )
        self._writable()
        if request.deleted:
            response.stored = storage.merge(request.path, request.key, request.version)
            return
        left = _span(request.expires_in, "expires_in") if request.HasField("expires_in") else None
        deadline = NEVER if left is None else storage.now() + left
        response.stored = storage.merge(request.path, request.key, request.version, request.value, deadline)

    def holds(self, path: Any, key: str) -> bool:
        """Whether the storage holds a live value of the key."""
        return self._storage.exists(path, key)

    def stats(self, request: pb.StatsRequest, response: pb.StatsResponse) -> None:
        """This node's figures: of the subtree at the request's path, and of the whole server."""
        storage = self._storage
        subtree = storage.subtree(request.path)
        namespace = response.namespace
        namespace.keys, namespace.bytes = subtree.keys, subtree.bytes
        namespace.expiring_keys, namespace.child_namespaces = subtree.expiring_keys, subtree.child_namespaces
        server = response.server
        server.keys, server.memory_bytes, server.max_memory_bytes = (
            storage.keys,
            storage.used_memory,
            storage.max_memory,
        )
        server.evictions, server.expired_keys = storage.evictions, storage.expired
        quota = storage.quota_at(request.path)
        if quota is not None:
            quota_path, response.quota.max_bytes, response.quota.used_bytes = quota
            response.quota.path.extend(quota_path)
        server.uptime.FromNanoseconds(int((time.monotonic() - self._started) * 1e9))
        server.version = VERSION


def _check_version(version: bytes, name: str) -> None:
    if len(version) != _VERSION_BYTES:
        raise InvalidArgument(
            f"{name} is {len(version)} bytes; a version is {_VERSION_BYTES} "
            "(as GetResponse.version gives it)",
            name,
        )


def _put_span(duration: Duration, seconds: float) -> None:
    whole = int(seconds)
    duration.seconds = whole
    duration.nanos = int((seconds - whole) * 1e9)


def unlogged() -> None:
    """`commit` and `writable` of a server without --data-dir: nothing to write, never refused."""
