"""Argument checks and conversions the stores make before any I/O, so a bad call never reaches the wire."""

from __future__ import annotations

from datetime import timedelta

MAX_SPAN_SECONDS = 315_576_000_000
"""The range of google.protobuf.Duration (10,000 years); the server enforces the same."""

MAX_SEGMENT_BYTES = 256
"""The server's default --max-segment-bytes; a server with a larger limit still accepts these."""


def span_seconds(span: int | float | timedelta | None, name: str) -> float | None:
    """Seconds of an expiry or renewal span given as int/float seconds or a timedelta; None stays None."""
    if span is None:
        return None
    if isinstance(span, timedelta):
        seconds = span.total_seconds()
    elif isinstance(span, int | float) and not isinstance(span, bool):
        seconds = float(span)
    else:
        raise TypeError(
            f"{name} must be seconds (int or float), a timedelta or None, not {type(span).__name__}"
        )
    if not seconds > 0:  # also rejects NaN
        raise ValueError(f"{name} must be positive, got {span!r}; pass None for no expiry")
    if seconds > MAX_SPAN_SECONDS:
        raise ValueError(f"{name} is {seconds:.0f} s; the limit is {MAX_SPAN_SECONDS} s (10,000 years)")
    return seconds


def check_segment(namespace: str) -> str:
    """A namespace segment: a non-empty str of at most MAX_SEGMENT_BYTES bytes of UTF-8."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
    if not namespace:
        raise ValueError("namespace must be a non-empty string")
    size = len(namespace.encode())
    if size > MAX_SEGMENT_BYTES:
        raise ValueError(f"namespace is {size} bytes of UTF-8; the limit is {MAX_SEGMENT_BYTES}")
    return namespace


def as_bytes(value: str | bytes) -> bytes:
    """A value to store: bytes as they are, str as UTF-8."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"value must be str or bytes, not {type(value).__name__}")


def check_key(key: str) -> str:
    """A key is a str that encodes to UTF-8 (no lone surrogates)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError as error:
            raise ValueError(f"key is not valid Unicode: {error.reason} at position {error.start}") from None
    return key


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
VERSION_BYTES = 16


def check_amount(amount: int) -> int:
    """An increment's amount: an int in the signed 64-bit range."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"amount must be an int, not {type(amount).__name__}")
    if not INT64_MIN <= amount <= INT64_MAX:
        raise ValueError(
            f"amount is {amount}; it must be within the signed 64-bit range [{INT64_MIN}, {INT64_MAX}]"
        )
    return amount


def check_version(version: bytes) -> bytes:
    """A version as a read returned it (Versioned.version): 16 bytes."""
    if not isinstance(version, bytes):
        raise TypeError(f"version must be bytes, not {type(version).__name__}")
    if len(version) != VERSION_BYTES:
        raise ValueError(
            f"version is {len(version)} bytes; a version is {VERSION_BYTES}, as a read returns it"
        )
    return version


def set_condition(if_absent: bool, if_present: bool, if_version: bytes | None) -> tuple[str, bytes]:
    """A conditional set's condition ("always", "absent", "present" or "version") and version;
    at most one may be given."""
    given = [
        name
        for name, on in (
            ("if_absent", if_absent),
            ("if_present", if_present),
            ("if_version", if_version is not None),
        )
        if on
    ]
    if len(given) > 1:
        raise ValueError(f"set_versioned takes at most one condition, got {' and '.join(given)}")
    if if_version is not None:
        return "version", check_version(if_version)
    return ("absent" if if_absent else "present" if if_present else "always"), b""


def whole_seconds(left: float) -> int:
    """Seconds left, rounded to the nearest whole second as Redis's TTL rounds them."""
    return int(left + 0.5)
