"""How to talk to a node: the channel options both GrpcStore and the nodes use, and the loopback check."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from nestkv.v1 import store_pb2 as pb

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000

_SERVICE = pb.DESCRIPTOR.services_by_name["StoreService"]

# Every StoreService RPC but Increment is idempotent (Set writes the same value,
# Delete and DeleteAll remove the same keys), so UNAVAILABLE, which gRPC raises
# when a call could not be delivered, is retried with exponential backoff.
# Increment is never retried: sent again, it would count twice. (A Set or
# Delete with a condition is not idempotent either, but has the method of one
# that is: a server answers its failures with a "do not retry" pushback, yet a
# connection lost after it was sent is retried: send those in a Pipeline, as
# GrpcStore does.) This is for callers of the one-operation RPCs; GrpcStore's
# Pipeline stream retries on its own (nestkv.wire.pipeline), so gRPC must not
# replay it as well.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": _SERVICE.full_name, "method": method.name}
                    for method in _SERVICE.methods
                    if not method.client_streaming and method.name != "Increment"
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> list[tuple[str, Any]]:
    """Channel options for GrpcStore and for the nodes' channels to each other: message sizes that
    fit `max_value_bytes`.

    They also carry a retry policy for the one-operation RPCs, for raw stubs
    on the same channel (GrpcStore's Pipeline stream retries on its own). Pass them to
    `grpc.aio.insecure_channel` / `secure_channel` when you build the channel yourself.
    """
    message_bytes = max_value_bytes + 1024 * 1024  # room for the key, path and framing
    return [
        ("grpc.max_send_message_length", message_bytes),
        ("grpc.max_receive_message_length", message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        # A connection can go silent without closing (a stuck peer, a half-open TCP connection):
        # only an unanswered ping finds out. A ping every 10 s, given 5 s to be answered, also
        # while idle, lets gRPC drop a dead connection and open a new one within ~15 s.
        # The server permits pings as often as once a second (nestkv.server.app).
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # grpcio 1.85 waits for a ping's answer this long, whatever keepalive_timeout_ms says
        # (default: 60 s; found by tests/client/test_silent_connection.py).
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A server (or cluster node) that was down is tried again every 0.1-0.2 s, not after
        # gRPC's default backoff of 1 s growing to 2 minutes: a restarted server is back for its
        # callers within a quarter of a second of accepting connections (operations wait for it
        # meanwhile, within their deadline: nestkv.wire.pipeline). A refused connection costs the
        # server nothing. (The connect timeout stays gRPC's 20 s: a far server's TLS handshake.)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 200),
    ]


def is_loopback_host(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost).

    The client and the server's protected mode (nestkv.server.security) ask the same: one answer.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Whether a "host:port" target names this machine (127.0.0.0/8, [::1], localhost)."""
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:").rpartition(":")[0]
    return is_loopback_host(host.removeprefix("[").removesuffix("]"))


def seed_targets(target: str | Sequence[str]) -> list[str]:
    """The addresses in `target`: a list of them, or "host:port,host:port" (a gRPC target URI with
    a scheme, such as "ipv4:10.0.0.1:50051,10.0.0.2:50051", is one address)."""
    if isinstance(target, str):
        scheme = target.partition(":")[0]
        targets = [target] if scheme in _SCHEMES or "://" in target else target.split(",")
    else:
        targets = list(target)
    if not targets or not all(isinstance(one, str) and one.strip() for one in targets):
        raise ValueError(f"target must name at least one address (host:port), got {target!r}")
    return [one.strip() for one in targets]


_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock"})
"""gRPC target URI schemes, whose commas do not separate addresses."""


def plaintext_token_refused(targets: Sequence[str]) -> str:
    """Why a token may not go in plaintext to `targets` ("": it may, every one is loopback). The
    caller adds how to give TLS credentials, in its own terms (an argument, a flag)."""
    for target in targets:
        if not is_loopback_target(target):
            return (
                f"a token is sent only over TLS, or in plaintext to a loopback address; {target!r} is neither"
            )
    return ""
