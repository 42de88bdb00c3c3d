"""StorageObject and the client's own argument checks."""

from __future__ import annotations

from datetime import timedelta

import litestar.stores.base as litestar_base
import pytest

from nestkv.client import StorageObject
from nestkv.client._arguments import MAX_SEGMENT_BYTES, MAX_SPAN_SECONDS
from nestkv.server.limits import MAX_DURATION_SECONDS, Limits


def test_storage_object_without_expiry() -> None:
    obj = StorageObject.new(b"data", None)
    assert obj.expires_at is None
    assert obj.expired is False
    assert obj.expires_in == -1


@pytest.mark.parametrize("expires_in", [60, timedelta(seconds=60)])
def test_storage_object_with_expiry(expires_in: int | timedelta) -> None:
    obj = StorageObject.new(b"data", expires_in)
    assert obj.expired is False
    assert obj.expires_in in (59, 60)


def test_storage_object_expired() -> None:
    obj = StorageObject.new(b"data", timedelta(seconds=-1))
    assert obj.expired is True
    assert obj.expires_in == 0


def test_storage_object_round_trips_and_reads_litestars_bytes() -> None:
    obj = StorageObject.new(b"\x00data", timedelta(days=3))
    assert StorageObject.from_bytes(obj.to_bytes()) == obj
    theirs = litestar_base.StorageObject.new(b"x", 10)
    assert StorageObject.from_bytes(theirs.to_bytes()).data == b"x"
    assert litestar_base.StorageObject.from_bytes(obj.to_bytes()).expires_at == obj.expires_at


def test_client_limits_agree_with_the_server_defaults() -> None:
    assert Limits().max_segment_bytes == MAX_SEGMENT_BYTES
    assert MAX_SPAN_SECONDS == MAX_DURATION_SECONDS
