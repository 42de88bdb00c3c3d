"""Persistence driven directly: logs, snapshots and recovery, with injected clocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from nestkv.server.errors import StoreUnavailable
from nestkv.server.storage import NEVER, NamespacedStorage
from nestkv.server.storage.clock import HybridClock
from nestkv.server.storage.persistence import (
    Persistence,
    PersistenceError,
    SnapshotChunk,
    SnapshotEnd,
    SnapshotHeader,
    frame,
)
from nestkv.server.storage.tombstones import Tombstones
from nestkv.server.storage.tree import version_of
from tests.polling import eventually


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


def recovered(
    directory: Path, clocks: Clocks, fsync: str = "always"
) -> dict[tuple[tuple[str, ...], str], bytes]:
    """What a server restarted on `directory` holds."""
    storage, persistence = open_store(directory, clocks, fsync)
    try:
        return contents(storage)
    finally:
        persistence.close()


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
    assert recovered(tmp_path, clocks) == {((), "kept"): b"v"}


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
    assert recovered(tmp_path, clocks) == {((), "kept"): b"1"}


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
    assert recovered(tmp_path, clocks) == {((), "key"): b"v", ((), "after"): b"v"}


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
    with pytest.raises(FileExistsError):
        await persistence.snapshot(storage)
    storage.set((), "after", b"v")
    persistence.close()
    blocked.rmdir()
    assert recovered(tmp_path, clocks) == {((), "key"): b"v", ((), "after"): b"v"}


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
    assert recovered(tmp_path, clocks) == {((), "before"): b"1", ((), "during"): b"2"}


def test_recovery_removes_the_files_of_snapshots_cut_short(tmp_path: Path) -> None:
    clocks = Clocks()
    _, persistence = open_store(tmp_path, clocks)
    leftover = persistence.snapshot_temporary()
    leftover.write_bytes(b"half a snapshot")
    persistence.close()
    _, persistence = open_store(tmp_path, clocks)
    assert not leftover.exists()
    persistence.close()


async def test_a_failed_snapshot_is_tried_again_while_changes_are_pending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "key", b"v")
    persistence.commit()
    blocked = persistence.snapshot_temporary()
    blocked.mkdir()  # the first round cannot create its file
    rounds = asyncio.create_task(persistence.snapshot_forever(storage, interval=0.01))
    await eventually(lambda: "snapshot failed" in caplog.text)
    assert "FileExistsError" in caplog.text  # the cause is logged
    blocked.rmdir()  # the server is idle from here on: no new writes trigger the retry
    await eventually((tmp_path / "snapshot.msgpack").exists)
    rounds.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await rounds
    assert not persistence.has_changes()
    persistence.close()
    assert recovered(tmp_path, clocks) == {((), "key"): b"v"}


async def test_a_cancelled_snapshot_leaves_no_file_and_keeps_its_changes_pending(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    for i in range(20_000):  # several chunks: the snapshot yields between them
        storage.set(("big",), f"k{i}", b"v")
    persistence.commit()
    temporary = persistence.snapshot_temporary()
    snapshot = asyncio.create_task(persistence.snapshot(storage))
    await eventually(temporary.exists, interval=0)
    snapshot.cancel()
    with pytest.raises(asyncio.CancelledError):
        await snapshot
    assert not temporary.exists()
    assert not (tmp_path / "snapshot.msgpack").exists()
    assert persistence.has_changes()
    assert await persistence.snapshot(storage) == 20_000  # the next round writes it whole
    persistence.close()
    storage, persistence = open_store(tmp_path, clocks)
    assert len(contents(storage)) == 20_000
    persistence.close()


async def test_a_renewal_logged_after_a_snapshot_outlives_the_deadline_in_the_snapshot(
    tmp_path: Path,
) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "session", b"s", ttl=10)
    await persistence.snapshot(storage)  # holds the deadline now + 10
    storage.get((), "session", renew_for=1000)  # in the log after the snapshot
    persistence.commit()
    persistence.close()
    clocks.advance(60)  # down past the first deadline, not the renewed one
    clocks.restart()
    storage, persistence = open_store(tmp_path, clocks)
    assert contents(storage) == {((), "session"): b"s"}
    left = storage.expires_in((), "session")
    assert left is not None
    assert left == pytest.approx(1000 - 60)
    persistence.close()


class FsyncCounter:
    """Stands in for os.fsync around the real one: counts the calls per descriptor, can fail them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        self.failing = False
        real = os.fsync

        def fsync(fd: int) -> None:
            self.calls.append(fd)
            if self.failing:
                raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def test_fsync_always_fsyncs_the_log_before_each_commit_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, persistence = open_store(tmp_path, Clocks(), "always")
    fsyncs = FsyncCounter(monkeypatch)
    for i in range(3):
        storage.set((), f"k{i}", b"v")
        persistence.commit()
        assert fsyncs.calls == [persistence._log_fd] * (i + 1)
    persistence.commit()  # nothing new: nothing to fsync
    assert len(fsyncs.calls) == 3
    persistence.close()


@pytest.mark.parametrize("fsync", ["everysec", "no"])
async def test_fsync_everysec_fsyncs_from_the_background_and_no_never_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: str
) -> None:
    storage, persistence = open_store(tmp_path, Clocks(), fsync)
    fsyncs = FsyncCounter(monkeypatch)
    syncing = asyncio.create_task(persistence.sync_forever(interval=0.01)) if fsync == "everysec" else None
    storage.set((), "k", b"v")
    persistence.commit()
    assert fsyncs.calls == []  # the write is answered without one
    await asyncio.sleep(0.2)
    if syncing is not None:
        assert fsyncs.calls == [persistence._log_fd]  # once for the write, none while idle after it
        syncing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await syncing
    else:
        assert fsyncs.calls == []
    persistence.close()


def test_a_failed_fsync_refuses_writes_until_an_fsync_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, persistence = open_store(tmp_path, Clocks(), "always")
    fsyncs = FsyncCounter(monkeypatch)
    storage.set((), "k", b"v")
    fsyncs.failing = True
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        persistence.commit()  # the write(2) went through, the fsync did not
    with pytest.raises(StoreUnavailable):
        persistence.writable()  # nothing is pending, but the record is not on disk yet: still failing
    assert len(fsyncs.calls) == 2  # and the fsync was tried again
    fsyncs.failing = False
    persistence.writable()
    assert len(fsyncs.calls) == 3
    persistence.writable()  # healthy: nothing more to do
    assert len(fsyncs.calls) == 3
    persistence.close()


def test_after_a_failed_fsync_the_unsynced_records_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks, "always")
    storage.set((), "before", b"1")
    persistence.commit()
    synced = (tmp_path / "log.0.msgpack").stat().st_size
    fsyncs = FsyncCounter(monkeypatch)
    fsyncs.failing = True
    storage.set((), "during", b"2")
    with pytest.raises(StoreUnavailable):
        persistence.commit()
    # What a failed fsync may leave on disk: the pages written since the last good one, dropped.
    size = (tmp_path / "log.0.msgpack").stat().st_size
    with (tmp_path / "log.0.msgpack").open("r+b") as file:
        file.seek(synced)
        file.write(bytes(size - synced))
    fsyncs.failing = False
    persistence.writable()
    storage.set((), "after", b"3")
    persistence.commit()
    persistence.close()
    assert recovered(tmp_path, clocks, "always") == {
        ((), "before"): b"1",
        ((), "during"): b"2",
        ((), "after"): b"3",
    }


async def test_no_snapshot_rotates_a_log_that_cannot_be_written(tmp_path: Path) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "before", b"1")
    persistence.commit()
    good = break_log(persistence, tmp_path)
    storage.set((), "during", b"2")
    with pytest.raises(StoreUnavailable):
        persistence.commit()
    with pytest.raises(PersistenceError, match="no snapshot while the log cannot be written"):
        await persistence.snapshot(storage)
    assert not (tmp_path / "log.1.msgpack").exists()  # the queued record still goes to log 0
    mend_log(persistence, good)
    persistence.writable()
    assert await persistence.snapshot(storage) == 2
    storage.set((), "after", b"3")
    persistence.close()
    assert recovered(tmp_path, clocks) == {((), "before"): b"1", ((), "during"): b"2", ((), "after"): b"3"}


async def test_a_snapshot_cancelled_during_its_fsync_waits_for_it_before_closing_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks = Clocks()
    storage, persistence = open_store(tmp_path, clocks)
    storage.set((), "key", b"v")
    persistence.commit()
    started, finished = threading.Event(), threading.Event()
    closed_under_it: list[int] = []
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        started.set()
        time.sleep(0.3)
        try:
            os.fstat(fd)
        except OSError:
            closed_under_it.append(fd)
        finally:
            finished.set()
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    snapshot = asyncio.create_task(persistence.snapshot(storage))
    await asyncio.to_thread(started.wait, 10)  # the first fsync: of the log being rotated out
    snapshot.cancel()
    with pytest.raises(asyncio.CancelledError):
        await snapshot
    await asyncio.to_thread(finished.wait, 10)
    assert closed_under_it == []
    assert not persistence.snapshot_temporary().exists()
    assert persistence.has_changes()
    persistence.close()


# Versions and tombstones


def versions_of(storage: NamespacedStorage) -> dict[tuple[tuple[str, ...], str], bytes]:
    return {
        (path, key): version_of(stored)
        for path, node in storage.namespaces()
        for key, stored in node.entries.items()
    }


@contextlib.contextmanager
def cluster_store(directory: Path, clocks: Clocks) -> Iterator[tuple[NamespacedStorage, Persistence]]:
    """A cluster node's storage (it keeps tombstones) on `directory`, its version clock on the
    test's wall clock; the directory is closed on the way out, as a server stopping closes it."""
    storage = NamespacedStorage(
        lambda: clocks.monotonic,
        versions=HybridClock("a", lambda: clocks.wall),
        tombstones=Tombstones(3600, 1000, lambda: clocks.wall),
    )
    persistence = Persistence.open(directory, "always", lambda: clocks.monotonic, lambda: clocks.wall)
    try:
        persistence.recover(storage)
        yield storage, persistence
    finally:
        persistence.close()


@pytest.mark.parametrize("snapshot", [False, True])
async def test_versions_and_tombstones_survive_a_restart(tmp_path: Path, snapshot: bool) -> None:
    clocks = Clocks()
    with cluster_store(tmp_path, clocks) as (storage, persistence):
        write_history(storage, persistence)
        storage.delete(("a",), "never-held")
        persistence.commit()
        if snapshot:
            await persistence.snapshot(storage)
        versions, tombstones = versions_of(storage), storage.tombstones
        assert tombstones is not None
        buried, emptied = dict(tombstones.keys), dict(tombstones.subtrees)
        assert ((("a",), "never-held")) in buried
        assert ("c",) in emptied
    clocks.restart()
    with cluster_store(tmp_path, clocks) as (storage, _):
        assert versions_of(storage) == versions
        assert storage.tombstones is not None
        assert dict(storage.tombstones.keys) == buried
        assert dict(storage.tombstones.subtrees) == emptied


def test_the_clock_is_ahead_of_everything_stored_after_a_restart_with_the_wall_clock_set_back(
    tmp_path: Path,
) -> None:
    clocks = Clocks()
    with cluster_store(tmp_path, clocks) as (storage, persistence):
        for number in range(100):
            storage.set(("ns",), f"k{number}", b"v")
        persistence.commit()
        newest = max(versions_of(storage).values())
    clocks.restart()
    clocks.wall -= 86_400  # the machine came back a day behind
    with cluster_store(tmp_path, clocks) as (storage, _):
        storage.set(("ns",), "after", b"v")
        assert versions_of(storage)[("ns",), "after"] > newest


def test_the_clock_starts_above_its_persisted_bound_even_with_nothing_stored(tmp_path: Path) -> None:
    clocks = Clocks()
    with cluster_store(tmp_path, clocks) as (storage, persistence):
        storage.set(("ns",), "k", b"v")
        persistence.commit()
        newest = versions_of(storage)[("ns",), "k"]
        storage.delete_all()  # nothing left to load a version from but the tombstone
    (tmp_path / "snapshot.msgpack").unlink(missing_ok=True)
    for log_file in tmp_path.glob("log.*"):
        log_file.unlink()
    clocks.wall -= 3600
    with cluster_store(tmp_path, clocks) as (storage, persistence):
        storage.set(("ns",), "k", b"again")
        assert versions_of(storage)[("ns",), "k"] > newest
        assert persistence.stopped_at is not None
        assert persistence.stopped_at >= clocks.wall


class OldSetRecord(msgspec.Struct, array_like=True, tag=0):
    """A set record as written before versions existed."""

    path: tuple[str, ...]
    key: str
    value: bytes
    deadline: float | None


class OldDeleteRecord(msgspec.Struct, array_like=True, tag=1):
    path: tuple[str, ...]
    key: str


def test_a_data_directory_written_before_versions_loads_and_newer_changes_win_over_it(
    tmp_path: Path,
) -> None:
    encode = msgspec.msgpack.encode
    header = SnapshotHeader("nestkv-snapshot", 1, 0)
    chunk = SnapshotChunk(("ns",), [("in-snapshot", b"old 1", None), ("overwritten", b"old 2", None)])
    (tmp_path / "snapshot.msgpack").write_bytes(
        frame(encode(header)) + frame(encode(chunk)) + frame(encode(SnapshotEnd(2)))
    )
    (tmp_path / "log.0.msgpack").write_bytes(
        frame(encode(OldSetRecord(("ns",), "overwritten", b"old 3", None)))
        + frame(encode(OldSetRecord(("ns",), "deleted", b"old 4", None)))
        + frame(encode(OldDeleteRecord(("ns",), "deleted")))
    )
    clocks = Clocks()
    with cluster_store(tmp_path, clocks) as (storage, _):
        assert contents(storage) == {(("ns",), "in-snapshot"): b"old 1", (("ns",), "overwritten"): b"old 3"}
        versions = versions_of(storage)
        assert max(versions.values()) < storage.versions.now()  # older than any change made now
        newer = HybridClock("b", lambda: clocks.wall).now()
        assert storage.merge(("ns",), "in-snapshot", newer, b"newer")
        assert storage.get(("ns",), "in-snapshot") == b"newer"


def test_a_copy_handed_off_leaves_no_tombstone_after_a_restart(tmp_path: Path) -> None:
    """Dropped because its owner has it now, not deleted: a tombstone would delete it there."""
    clocks = Clocks()
    with cluster_store(tmp_path, clocks) as (storage, persistence):
        storage.set(("ns",), "moved", b"v")
        [(path, node)] = list(storage.namespaces())
        [(key, stored)] = storage.entries(node)
        assert storage.delete_unchanged(path, key, stored)
        persistence.commit()
    with cluster_store(tmp_path, clocks) as (storage, _):
        assert storage.tombstones is not None
        assert len(storage.tombstones) == 0
        assert storage.get(("ns",), "moved") is None


def test_a_delete_taken_in_for_a_key_not_held_is_remembered_across_a_restart(tmp_path: Path) -> None:
    clocks = Clocks()
    with cluster_store(tmp_path, clocks) as (storage, persistence):
        deleted = HybridClock("b", lambda: clocks.wall).now()
        assert not storage.merge(("ns",), "never-held", deleted)
        persistence.commit()
    with cluster_store(tmp_path, clocks) as (storage, _):
        assert storage.tombstones is not None
        assert storage.tombstones.over(("ns",), "never-held") == deleted
