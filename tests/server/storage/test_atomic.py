"""The storage engine's atomic operations (increment, set_if, delete_if), driven directly: their
accounting, their limits, and what a restart on the data directory gives back."""

from __future__ import annotations

from pathlib import Path

import pytest

from nestkv.server.errors import FailedPrecondition, QuotaExceeded, StoreFull
from nestkv.server.storage import INT64_MAX, NEVER, NamespacedStorage
from tests.server.storage.conftest import FakeClock
from tests.server.storage.test_persistence import Clocks, open_store

PATH = ("ns",)


def test_increment_grows_the_value_and_its_accounting_with_the_digits(storage: NamespacedStorage) -> None:
    base = storage.used_memory
    assert storage.increment(PATH, "n", 9)[0] == 9
    one_digit = storage.used_memory
    assert storage.increment(PATH, "n", 1)[0] == 10
    assert storage.used_memory == one_digit + 1
    assert storage.subtree(PATH).bytes - (one_digit - base) == 1
    assert storage.increment(PATH, "n", -10)[0] == 0
    assert storage.used_memory == one_digit


def test_increment_returns_the_version_and_keeps_the_deadline_of_an_existing_key(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    _, first, deadline = storage.increment(PATH, "n", 1, ttl=10)
    assert deadline == clock.now + 10
    clock.advance(4)
    value, second, later = storage.increment(PATH, "n", 1, ttl=100)
    assert (value, later) == (2, deadline)
    assert second > first
    entry = storage.get_entry(PATH, "n")
    assert entry is not None
    assert entry[:2] == (b"2", second)
    assert entry[2] == pytest.approx(6)
    clock.advance(6)  # its deadline: gone, and counted again from the amount, with no expiry
    value, _, deadline = storage.increment(PATH, "n", 5)
    assert (value, deadline) == (5, NEVER)


def test_an_overflow_does_not_tell_the_stored_value(storage: NamespacedStorage) -> None:
    storage.set(PATH, "secret", b"9223372036854775000")
    with pytest.raises(FailedPrecondition) as refused:
        storage.increment(PATH, "secret", 10_000)
    assert "9223372036854775000" not in str(refused.value)
    assert "9223372036854785000" not in str(refused.value)


def test_a_failed_increment_changes_nothing(storage: NamespacedStorage) -> None:
    storage.set(PATH, "n", str(INT64_MAX).encode())
    before = (storage.get_entry(PATH, "n"), storage.used_memory)
    with pytest.raises(FailedPrecondition, match="outside the signed 64-bit range"):
        storage.increment(PATH, "n", 1)
    storage.set(PATH, "t", b"1e3")
    with pytest.raises(FailedPrecondition, match="not an integer"):
        storage.increment(PATH, "t", 1)
    assert storage.get(PATH, "t") == b"1e3"
    assert storage.get_entry(PATH, "n") == before[0]


def test_increment_and_conditional_sets_make_room_as_a_set_does(clock: FakeClock) -> None:
    storage = NamespacedStorage(clock, max_memory=1)
    with pytest.raises(StoreFull):
        storage.increment(PATH, "n", 1)
    with pytest.raises(StoreFull):
        storage.set_if(PATH, "k", b"v", None, "absent")
    assert storage.keys == 0
    quoted = NamespacedStorage(clock)
    quoted.quotas = {PATH: 50}
    with pytest.raises(QuotaExceeded):
        quoted.set_if(PATH, "k", b"v" * 100, None, "absent")
    assert quoted.keys == 0


def test_set_if_conditions(storage: NamespacedStorage, clock: FakeClock) -> None:
    assert storage.set_if(PATH, "k", b"v", None, "present") is None
    first = storage.set_if(PATH, "k", b"v1", 5, "absent")
    assert first is not None
    assert storage.set_if(PATH, "k", b"v2", None, "absent") is None
    assert storage.set_if(PATH, "k", b"v2", None, "version", b"\0" * 16) is None
    second = storage.set_if(PATH, "k", b"v2", None, "version", first)
    assert second is not None
    assert second > first
    assert storage.get_entry(PATH, "k") == (b"v2", second, NEVER)
    assert storage.set_if(PATH, "k", b"v3", 5, "present") is not None
    clock.advance(5)  # expired: absent, whatever its version was
    assert storage.set_if(PATH, "k", b"v4", None, "present") is None
    assert storage.set_if(PATH, "k", b"v4", None, "absent") is not None


def test_delete_if_and_delete_say_whether_a_live_value_went(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    version = storage.set(PATH, "k", b"mine", ttl=5)
    assert storage.delete_if(PATH, "k", value=b"other") is False
    assert storage.delete_if(PATH, "k", version=b"\0" * 16) is False
    assert storage.delete_if(PATH, "k", version=version) is True
    assert storage.delete(PATH, "k") is False
    storage.set(PATH, "k", b"mine", ttl=5)
    clock.advance(5)
    assert storage.delete_if(PATH, "k", value=b"mine") is False  # expired: nothing to release
    storage.set(PATH, "k", b"x")
    assert storage.delete(PATH, "k") is True


def test_atomic_writes_come_back_after_a_restart(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.increment(PATH, "n", 41)
    storage.increment(PATH, "n", 1, ttl=100)  # an existing key keeps having no expiry
    storage.set_if(PATH, "lock", b"token", 60, "absent")
    storage.set(PATH, "gone", b"v")
    storage.delete_if(PATH, "gone", value=b"v")
    persistence.commit()
    persistence.close()
    clocks.restart()
    again, persistence = open_store(tmp_path, clocks)
    try:
        assert again.get(PATH, "n") == b"42"
        assert again.expires_in(PATH, "n") == NEVER
        assert again.get(PATH, "lock") == b"token"
        assert 59 < (again.expires_in(PATH, "lock") or 0) <= 60
        assert again.get(PATH, "gone") is None
        assert again.increment(PATH, "n", 1)[0] == 43
    finally:
        persistence.close()
