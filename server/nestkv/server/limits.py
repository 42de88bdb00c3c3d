"""Request limits and the checks that enforce them before anything reaches storage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec

from nestkv.server.errors import InvalidArgument

KiB = 1024
MiB = 1024 * KiB

MAX_DURATION_SECONDS = 315_576_000_000
"""The range of google.protobuf.Duration: 10,000 years."""

Positive = Annotated[int, msgspec.Meta(ge=1)]
MIN_BATCH_OPERATIONS = 512
"""The batches GrpcStore sends by default, and the nodes to each other when they forward."""


class Limits(msgspec.Struct, frozen=True):
    """Size limits of keys, values and namespace paths; every request is checked against them."""

    max_key_bytes: Positive = 4 * KiB
    """Largest key, in bytes of UTF-8."""
    max_value_bytes: Positive = 16 * MiB
    """Largest value, in bytes."""
    max_depth: Positive = 32
    """Most namespace segments in a path."""
    max_segment_bytes: Positive = 256
    """Largest namespace segment, in bytes of UTF-8."""
    max_batch_operations: Annotated[int, msgspec.Meta(ge=MIN_BATCH_OPERATIONS)] = 10_000
    """Most operations in one Pipeline batch: what one batch may hold a stream's answers, and its
    peers' work, for. At least what GrpcStore and the nodes' forwarding send by default (512)."""

    def check_batch(self, operations: int) -> None:
        if operations > self.max_batch_operations:
            raise InvalidArgument(
                f"batch has {operations} operations; the limit is {self.max_batch_operations} "
                "(max_batch_operations): send it as several batches",
                "operations",
                self.max_batch_operations,
            )

    def max_message_bytes(self) -> int:
        """The gRPC message size that fits the largest request these limits allow."""
        return (
            self.max_value_bytes
            + self.max_key_bytes
            + self.max_depth * (self.max_segment_bytes + 8)
            + 64 * KiB
        )

    def check_path(self, path: Sequence[str]) -> None:
        if len(path) > self.max_depth:
            raise InvalidArgument(
                f"path has {len(path)} segments; the limit is {self.max_depth} (max_depth)",
                "path",
                self.max_depth,
            )
        for segment in path:
            check_segment(segment, self.max_segment_bytes)

    def check_key(self, key: str) -> None:
        # Four bytes per character at most: skip the encoding for the usual short key.
        if len(key) * 4 > self.max_key_bytes and len(key.encode()) > self.max_key_bytes:
            raise InvalidArgument(
                f"key is {len(key.encode())} bytes; the limit is {self.max_key_bytes} (max_key_bytes)",
                "key",
                self.max_key_bytes,
            )

    def check_value(self, value: bytes) -> None:
        if len(value) > self.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(value)} bytes; the limit is {self.max_value_bytes} (max_value_bytes)",
                "value",
                self.max_value_bytes,
            )


def check_segment(segment: str, max_segment_bytes: int) -> None:
    """A namespace segment is a non-empty string of at most `max_segment_bytes` bytes of UTF-8."""
    if not isinstance(segment, str):
        raise TypeError(f"namespace segment must be a str, not {type(segment).__name__}")
    if not segment:
        raise InvalidArgument("namespace segment is empty; segments must be non-empty strings", "path")
    size = len(segment.encode())
    if size > max_segment_bytes:
        raise InvalidArgument(
            f"namespace segment is {size} bytes; the limit is {max_segment_bytes} (max_segment_bytes)",
            "path",
            max_segment_bytes,
        )


def check_span(seconds: float, name: str) -> float:
    """A span given for expiry or renewal must be positive and within Duration's range."""
    if not seconds > 0:  # also rejects NaN
        raise InvalidArgument(
            f"{name} must be positive, got {seconds!r} s; omit it (None) for no expiry", name
        )
    if seconds > MAX_DURATION_SECONDS:
        raise InvalidArgument(
            f"{name} is {seconds!r} s; the limit is {MAX_DURATION_SECONDS} s (10,000 years)",
            name,
            MAX_DURATION_SECONDS,
        )
    return seconds
