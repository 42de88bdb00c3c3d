"""Persistence driven directly: logs, snapshots and recovery, with injected clocks."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest

from server.errors import StoreUnavailable
from server.storage import NEVER, NamespacedStorage
from server.storage.persistence import Persistence, PersistenceError


class Clocks:
    """A monotonic clock and a wall clock that advance together, as across a server's life."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.monotonic = monotonic
        self.wall = wall

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds

    def restart(self) -> None:
        """A new process: its monotonic clock starts somewhere else entirely."""
        self.monotonic = 50.0


def open_store(
    directory: Path, clocks: Clocks, fsync: str = "always"
) -> tuple[NamespacedStorage, Persistence]:
    storage = NamespacedStorage(lambda: clocks.monotonic)
    persistence = Persistence.open(directory, fsync, lambda: clocks.monotonic, lambda: clocks.wall)  # type: ignore[arg-type]
    persistence.recover(storage)
    return storage, persistence


def contents(storage: NamespacedStorage) -> dict[tuple[tuple[str, ...], str], bytes]:
    found = {}
    for path, node in storage.namespaces():
        for key in list(node.entries):
            value = storage.get(path, key)
            if value is not None:
                found[path, key] = value
    return found


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def write_history(storage: NamespacedStorage, persistence: Persistence) -> None:
    storage.set(("a",), "plain", b"1")
    storage.set(("a", "b"), "ttl", b"2", ttl=100)
    storage.set(("c",), "doomed", b"3")
    storage.delete_all(("c",))
    storage.set((), "deleted", b"4")
    storage.delete((), "deleted")
    storage.set((), "renewed", b"5", ttl=10)
    storage.get((), "renewed", renew_for=500)
    persistence.commit()


EXPECTED = {(("a",), "plain"): b"1", (("a", "b"), "ttl"): b"2", ((), "renewed"): b"5"}


@pytest.mark.parametrize("snapshot", [False, True])
async def test_every_kind_of_write_survives_a_restart(tmp_path: Path, snapshot: bool) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    write_history(storage, persistence)
    if snapshot:
        assert await persistence.snapshot(storage) == 3
    persistence.close()
    clocks.advance(30)  # down for 30 s
    clocks.restart()
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == EXPECTED
    assert storage.expires_in(("a", "b"), "ttl") == pytest.approx(70)  # wall-clock deadlines
    assert storage.expires_in((), "renewed") == pytest.approx(470)
    assert storage.expires_in(("a",), "plain") == NEVER
    persistence.close()


@pytest.mark.parametrize("snapshot", [False, True])
async def test_keys_that_expired_while_down_never_come_back(tmp_path: Path, snapshot: bool) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "key", b"old")
    storage.set((), "key", b"short-lived", ttl=5)  # replaces the old value, then expires
    storage.set((), "kept", b"v", ttl=50)
    persistence.commit()
    if snapshot:
        await persistence.snapshot(storage)
    persistence.close()
    clocks.advance(10)
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == {((), "kept"): b"v"}
    persistence.close()


async def test_writes_during_a_snapshot_are_kept(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    for i in range(12_000):  # more than one chunk: the snapshot yields in between
        storage.set(("big",), f"k{i}", b"v")
    persistence.commit()

    async def write_meanwhile() -> None:
        for i in range(50):
            storage.set(("big",), f"k{i}", b"changed")
            storage.delete(("big",), f"k{11_000 + i}")
            storage.set(("new",), f"k{i}", b"n")
            persistence.commit()
            await asyncio.sleep(0)

    await asyncio.gather(persistence.snapshot(storage), write_meanwhile())
    expected = contents(storage)
    persistence.close()
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == expected
    assert len(expected) == 12_000 - 50 + 50
    persistence.close()


def test_a_torn_tail_is_cut_off_at_every_byte_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clocks = Clocks()
    source = tmp_path / "source"
    storage, persistence = open_store(source, clocks)
    storage.set(("ns",), "first", b"1")
    storage.set(("ns",), "second", b"2")
    persistence.commit()
    log_file = next(source.glob("log.*.msgpack"))
    intact = log_file.stat().st_size
    storage.set(("ns",), "last", b"3" * 40)
    persistence.close()
    whole = log_file.read_bytes()
    assert len(whole) > intact
    for cut in range(intact + 1, len(whole)):
        directory = tmp_path / f"cut{cut}"
        shutil.copytree(source, directory, ignore=shutil.ignore_patterns("lock"))
        (directory / log_file.name).write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            recovered, persistence = open_store(directory, clocks)
        assert contents(recovered) == {(("ns",), "first"): b"1", (("ns",), "second"): b"2"}, cut
        assert "dropped a torn or corrupt tail" in caplog.text
        assert (directory / log_file.name).stat().st_size == intact  # cut back to the last whole record
        persistence.close()


def test_a_corrupt_record_in_the_tail_is_dropped_too(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "kept", b"1")
    persistence.commit()
    storage.set((), "flipped", b"2")
    persistence.close()
    flip_last_byte(next(tmp_path.glob("log.*.msgpack")))
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == {((), "kept"): b"1"}
    persistence.close()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_a_corrupt_snapshot_refuses_to_start(tmp_path: Path, damage: str) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "key", b"v" * 100)
    persistence.commit()
    await persistence.snapshot(storage)
    persistence.close()
    snapshot = tmp_path / "snapshot.msgpack"
    data = bytearray(snapshot.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-3:]
    snapshot.write_bytes(bytes(data))
    with pytest.raises(PersistenceError, match=r"snapshot .* is damaged at byte \d+ .* Refusing to start"):
        open_store(tmp_path, clocks)


def test_only_one_server_may_use_a_data_directory(tmp_path: Path) -> None:
    clocks = Clocks()
    _, persistence = open_store(tmp_path, clocks)
    with pytest.raises(PersistenceError, match=r"in use by another nestkv server \(pid \d+\)"):
        Persistence.open(tmp_path, "always")
    persistence.close()
    _, again = open_store(tmp_path, clocks)  # free once the first one closed
    again.close()


async def test_a_snapshot_drops_the_logs_it_covers(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "key", b"v")
    persistence.commit()
    await persistence.snapshot(storage)
    storage.set((), "after", b"v")
    persistence.commit()
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("log.")) == ["log.1.msgpack"]
    persistence.close()
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == {((), "key"): b"v", ((), "after"): b"v"}
    persistence.close()


def test_damage_in_a_log_that_is_not_the_last_refuses_to_start(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "a", b"1")
    storage.set((), "b", b"2")
    persistence.close()
    flip_last_byte(next(tmp_path.glob("log.*.msgpack")))
    (tmp_path / "log.7.msgpack").write_bytes(b"")  # a later log: the damage is not a torn tail
    with pytest.raises(PersistenceError, match=r"is damaged at byte .* and later logs follow it"):
        open_store(tmp_path, clocks)


async def test_a_failed_snapshot_keeps_the_logs(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "key", b"v")
    persistence.commit()
    blocked = persistence.snapshot_temporary()
    blocked.mkdir()  # the writer cannot create its file
    with pytest.raises(PersistenceError, match=r"the snapshot writer failed \(IsADirectoryError"):
        await persistence.snapshot(storage)
    storage.set((), "after", b"v")
    persistence.close()
    blocked.rmdir()
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == {((), "key"): b"v", ((), "after"): b"v"}
    persistence.close()


def break_log(persistence: Persistence, directory: Path) -> int:
    """Make the log unwritable (as a full or failing disk would); returns the good descriptor."""
    good = persistence._log_fd
    persistence._log_fd = os.open(directory / "lock", os.O_RDONLY)  # every write(2) fails: EBADF
    return good


def mend_log(persistence: Persistence, good: int) -> None:
    os.close(persistence._log_fd)
    persistence._log_fd = good


def test_a_log_that_cannot_be_written_refuses_writes_until_it_can(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "before", b"1")
    persistence.commit()
    good = break_log(persistence, tmp_path)
    storage.set((), "during", b"2")
    with pytest.raises(StoreUnavailable, match=r"cannot write the log in .*refuses writes until it can"):
        persistence.commit()
    with pytest.raises(StoreUnavailable):
        persistence.writable()  # and it stays so
    mend_log(persistence, good)
    persistence.writable()  # the queued record goes out now
    persistence.close()
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == {((), "before"): b"1", ((), "during"): b"2"}
    persistence.close()


def test_recovery_removes_the_files_of_snapshots_cut_short(tmp_path: Path) -> None:
    clocks = Clocks()
    _, persistence = open_store(tmp_path, clocks)
    leftover = persistence.snapshot_temporary()
    leftover.write_bytes(b"half a snapshot")
    persistence.close()
    _, persistence = open_store(tmp_path, clocks)
    assert not leftover.exists()
    persistence.close()
