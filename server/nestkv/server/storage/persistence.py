"""Persistence: an append-only log of every mutation, and snapshots of the whole store.

Files in the data directory:

    lock                  held (flock) by the one server using the directory
    snapshot.msgpack      the last complete snapshot; names the first log not in it
    log.<N>.msgpack       the append-only logs, replayed in order of N after the snapshot
    clock                 a bound the version clock will not pass before writing a new one
                          (8 bytes, big-endian; storage.clock), kept a few seconds ahead

Both kinds of file are sequences of frames: a 4-byte length and a 4-byte CRC32
of the payload, then the payload, a msgspec (msgpack) record. Deadlines are
written as wall-clock instants (Unix seconds), so that a key keeps the time it
had left across a restart, and a key whose deadline passed while the server
was down is not brought back.

The `fsync` policy is Redis's `appendfsync`: `always` fsyncs the log before a
write is answered, `everysec` once a second, `no` leaves it to the OS. In
every policy the records of a write reach the OS (write(2)) before the write
is answered, so a crash of the server process loses no answered write; a
crash of the machine loses what was not fsynced.

A snapshot rotates the log (records from then on go to a new log), then
writes the store to a temporary file from the serving process itself, a
chunk of entries at a time with requests served in between, fsyncs it and
renames it into place, and deletes the logs it covers. The file is fuzzy:
each chunk is as the store was when that chunk was written. Recovery
replays the logs from the rotation on over it, which makes it exact,
because every change since the rotation is in those logs, each with its
version, and recovery takes every entry, tombstone and record in through
NamespacedStorage.merge: a change older than what is loaded already is
dropped, whatever order the two come in.

Records and snapshots written before versions existed (snapshot format 1,
records without a version) still load: each gets a version below every
stamped one, increasing in the order they are read, so that they replay as
they always did and any change made since wins over them.

No fork: a forked child of a process that runs gRPC's threads can crash in
gRPC's fork handlers, and a child that outlives its server holds its files.
A snapshot here is a task of the server: cancelled, it removes its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from nestkv.server.errors import StoreUnavailable
from nestkv.server.storage.clock import BOUND_AHEAD, LEGACY, seconds_of
from nestkv.server.storage.engine import NEVER, Clock, NamespacedStorage
from nestkv.server.storage.tree import deadline_of, value_of, version_of

log = logging.getLogger("nestkv.persistence")

FsyncPolicy = Literal["always", "everysec", "no"]
_FRAME = struct.Struct("<II")
_LOG_NAME = re.compile(r"^log\.(\d+)\.msgpack$")
_SNAPSHOT = "snapshot.msgpack"
_CLOCK = "clock"
_SNAPSHOT_CHUNK = 2_000  # entries written between two turns of the event loop: ~1 ms of work
_T = TypeVar("_T")


# Each record ends with the version of its change; written before versions, it has none (LEGACY).


class SetRecord(msgspec.Struct, array_like=True, tag=0, gc=False):
    path: tuple[str, ...]
    key: str
    value: bytes
    deadline: float | None  # wall clock; None: never expires
    version: bytes = LEGACY


class DeleteRecord(msgspec.Struct, array_like=True, tag=1, gc=False):
    path: tuple[str, ...]
    key: str
    version: bytes = LEGACY


class DeleteAllRecord(msgspec.Struct, array_like=True, tag=2, gc=False):
    path: tuple[str, ...]
    version: bytes = LEGACY


class RenewRecord(msgspec.Struct, array_like=True, tag=3, gc=False):
    path: tuple[str, ...]
    key: str
    deadline: float
    version: bytes = LEGACY


class DropRecord(msgspec.Struct, array_like=True, tag=4, gc=False):
    """A copy left (handed off to its owner, or evicted): removed if still that version, no tombstone."""

    path: tuple[str, ...]
    key: str
    version: bytes


Record = SetRecord | DeleteRecord | DeleteAllRecord | RenewRecord | DropRecord


class SnapshotHeader(msgspec.Struct, array_like=True, tag=10):
    format: str
    version: int
    first_log: int  # the first log whose records the snapshot may not hold


class SnapshotChunk(msgspec.Struct, array_like=True, tag=11, gc=False):
    """Format 1: entries without versions."""

    path: tuple[str, ...]
    entries: list[tuple[str, bytes, float | None]]  # key, value, wall-clock deadline


class SnapshotEnd(msgspec.Struct, array_like=True, tag=12):
    entries: int


class VersionedChunk(msgspec.Struct, array_like=True, tag=13, gc=False):
    """Format 2: entries of one namespace."""

    path: tuple[str, ...]
    entries: list[tuple[str, bytes, float | None, bytes]]  # key, value, wall-clock deadline, version


class TombstoneChunk(msgspec.Struct, array_like=True, tag=14, gc=False):
    """Format 2: tombstones, after every entry."""

    keys: list[tuple[tuple[str, ...], str, bytes]]  # path, key, version
    subtrees: list[tuple[tuple[str, ...], bytes]]  # path, version


SnapshotFrame = SnapshotHeader | SnapshotChunk | SnapshotEnd | VersionedChunk | TombstoneChunk
_FORMAT = 2

_encode = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(Record).decode
_decode_snapshot = msgspec.msgpack.Decoder(SnapshotFrame).decode


class PersistenceError(Exception):
    """The data directory cannot be used; the message says why and what to do."""


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes) -> tuple[list[bytes], int]:
    """The payloads of the whole, intact frames at the start of `data`, and where they end."""
    payloads, offset = [], 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if end > len(data):
            break
        payload = data[offset + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            break
        payloads.append(payload)
        offset = end
    return payloads, offset


class Persistence:
    """The log and snapshots of one data directory, for one NamespacedStorage.

    `open` locks the directory; `recover` loads it into the storage, starts
    the log and becomes the storage's journal: the storage reports each
    mutation here, and the server calls `commit` before it answers the writes.
    """

    def __init__(
        self, directory: Path, fsync: FsyncPolicy, clock: Clock = time.monotonic, wall: Clock = time.time
    ) -> None:
        self.directory = directory
        self.fsync_policy = fsync
        self._clock = clock
        self._wall = wall
        self._lock_fd = -1
        self._log_fd = -1
        self._log_number = 0
        self._pending = bytearray()  # records not written to the log yet
        self._failure: str | None = None  # why the log could not be written, until it can again
        # Under `always`: the log's size at its last successful fsync, and what was written after it.
        # After a failed fsync the kernel may have dropped those pages, so they are written again.
        self._synced_size = 0
        self._unsynced_records = bytearray()
        self._fsyncing = asyncio.Lock()  # the everysec fsync against a snapshot closing the old log
        self._unsynced = False
        self._records_since_snapshot = 0
        self._legacy = 0  # versions given so far to what was written before versions
        self._clock_fd = -1
        self.stopped_at: float | None = None
        """Until when (wall clock, about) the last server on this directory ran; None: unknown."""
        self.last_snapshot: float | None = None
        """When (wall clock) the last complete snapshot was written; None: never."""

    @classmethod
    def open(
        cls, directory: Path, fsync: FsyncPolicy, clock: Clock = time.monotonic, wall: Clock = time.time
    ) -> Persistence:
        """Create the directory if needed and lock it; a second server on it gets PersistenceError."""
        persistence = cls(directory, fsync, clock, wall)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PersistenceError(
                f"data directory {directory} is in use by another nestkv server (pid {holder}); "
                "only one server may use a data directory at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        persistence._lock_fd = fd
        return persistence

    def close(self) -> None:
        """Write out and fsync what is pending, close the log and release the lock."""
        if self._log_fd >= 0:
            try:
                self._flush()
                os.fsync(self._log_fd)
            except (StoreUnavailable, OSError) as error:  # only refused writes are still queued
                log.error("closing the log with records that could not be written: %s", error)
            os.close(self._log_fd)
            self._log_fd = -1
        if self._clock_fd >= 0:
            os.close(self._clock_fd)
            self._clock_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # Recovery

    def recover(self, storage: NamespacedStorage) -> None:
        """Load the snapshot and replay the logs into `storage`, then open the log for appending.

        A corrupt snapshot, or a corrupt record in a log that is not the last,
        raises PersistenceError: starting empty would silently lose the data.
        A torn or corrupt tail of the last log (a crash mid-write) is cut off
        with a warning.
        """
        self._open_clock(storage)
        first_log, loaded = self._load_snapshot(storage)
        logs = [number for number in self._log_numbers() if number >= first_log]
        replayed = 0
        for index, number in enumerate(logs):
            replayed += self._replay(storage, number, last=index == len(logs) - 1)
        for number in self._log_numbers():
            if number < first_log:  # covered by the snapshot; left by a crash before their removal
                (self._log_path(number)).unlink()
        for leftover in self.directory.glob(_SNAPSHOT + ".*.tmp"):  # of a snapshot cut short
            leftover.unlink()
        self._log_number = logs[-1] if logs else first_log
        self._log_fd = os.open(
            self._log_path(self._log_number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        self._synced_size = os.fstat(self._log_fd).st_size
        self._records_since_snapshot = replayed
        storage.journal = self
        log.info(
            "recovered %d entries from the snapshot and %d log records from %s",
            loaded,
            replayed,
            self.directory,
        )

    def _load_snapshot(self, storage: NamespacedStorage) -> tuple[int, int]:
        path = self.directory / _SNAPSHOT
        if not path.exists():
            return 0, 0
        self.last_snapshot = path.stat().st_mtime
        data = path.read_bytes()
        payloads, end = read_frames(data)
        problem = None
        if end != len(data):
            problem = f"damaged at byte {end} of {len(data)} (checksum mismatch or truncation)"
        frames: list[SnapshotFrame] = []
        if problem is None:
            try:
                frames = [_decode_snapshot(payload) for payload in payloads]
            except msgspec.DecodeError as error:
                problem = f"unreadable: {error}"
        if problem is None and (
            not frames
            or not isinstance(frames[0], SnapshotHeader)
            or not isinstance(frames[-1], SnapshotEnd)
            or frames[-1].entries
            != sum(len(f.entries) for f in frames if isinstance(f, (SnapshotChunk, VersionedChunk)))
        ):
            problem = "incomplete: its header or end frame is missing or does not match"
        if problem is not None:
            raise PersistenceError(
                f"snapshot {path} is {problem}. Refusing to start rather than start without its data: "
                "restore it from a backup, or move it away to start from the logs alone"
            )
        header = frames[0]
        assert isinstance(header, SnapshotHeader)
        clock_minus_wall = -self._wall_minus_clock()
        loaded = 0
        merge = storage.merge
        for chunk in frames[1:-1]:
            # An entry whose deadline has passed is loaded all the same (invisible, and reaped
            # soon): a renewal in the logs after the snapshot may still give it a later one.
            if isinstance(chunk, VersionedChunk):
                for key, value, deadline, version in chunk.entries:
                    at = NEVER if deadline is None else deadline + clock_minus_wall
                    merge(chunk.path, key, version, value, at, make_room=False)
                loaded += len(chunk.entries)
            elif isinstance(chunk, SnapshotChunk):
                for key, value, deadline in chunk.entries:
                    at = NEVER if deadline is None else deadline + clock_minus_wall
                    merge(chunk.path, key, self._legacy_version(), value, at, make_room=False)
                loaded += len(chunk.entries)
            elif isinstance(chunk, TombstoneChunk):
                for namespace, key, version in chunk.keys:
                    merge(namespace, key, version)
                for namespace, version in chunk.subtrees:
                    storage.merge_subtree(namespace, version)
        return header.first_log, loaded

    def _replay(self, storage: NamespacedStorage, number: int, *, last: bool) -> int:
        path = self._log_path(number)
        data = path.read_bytes()
        payloads, end = read_frames(data)
        records: list[Record] = []
        for index, payload in enumerate(payloads):
            try:
                records.append(_decode_record(payload))
            except msgspec.DecodeError:
                end = sum(_FRAME.size + len(p) for p in payloads[:index])
                break
        if end != len(data):
            if not last:
                raise PersistenceError(
                    f"log {path} is damaged at byte {end} of {len(data)}, and later logs follow it: "
                    "refusing to start rather than skip the writes after the damage"
                )
            log.warning(
                "log %s: dropped a torn or corrupt tail of %d bytes at byte %d (a crash mid-write); "
                "the writes before it are recovered",
                path,
                len(data) - end,
                end,
            )
            with path.open("r+b") as file:
                file.truncate(end)
                os.fsync(file.fileno())
        clock_minus_wall = -self._wall_minus_clock()
        for record in records:
            if record.version == LEGACY:
                record.version = self._legacy_version()
            apply(storage, record, clock_minus_wall)
        return len(records)

    def _legacy_version(self) -> bytes:
        """The version of the next record or entry read that was written before versions."""
        self._legacy += 1
        return self._legacy.to_bytes(16, "big")

    # The version clock's bound

    def _open_clock(self, storage: NamespacedStorage) -> None:
        """Start the storage's clock above the bound persisted here, and persist it here from now on."""
        self._clock_fd = os.open(self.directory / _CLOCK, os.O_RDWR | os.O_CREAT, 0o644)
        saved = os.pread(self._clock_fd, 8, 0)
        if len(saved) == 8:
            bound = int.from_bytes(saved, "big")
            storage.versions.start_above(bound)
            self.stopped_at = seconds_of(bound - BOUND_AHEAD)
        storage.versions.persist_with(self._save_clock)

    def _save_clock(self, bound: int) -> None:
        """Write the clock's bound (once every few seconds at most), fsynced as the log is: at once
        under `always`, by `sync_forever` under `everysec`."""
        try:
            os.pwrite(self._clock_fd, bound.to_bytes(8, "big"), 0)
            if self.fsync_policy == "always":
                os.fdatasync(self._clock_fd)  # 8 bytes in place: no metadata to flush but the size
            self._unsynced = True
        except OSError as error:  # the log's own failure refuses the writes; this one is only logged
            log.error(
                "cannot write the version clock's bound in %s: %s; after a restart with the wall "
                "clock set back, new versions could be older than some written now",
                self.directory,
                error,
            )

    # Logging: the storage's Journal

    def set(self, path: Sequence[str], key: str, value: bytes, deadline: float, version: bytes) -> None:
        self._record(SetRecord(tuple(path), key, value, self.wall_deadline(deadline), version))

    def renew(self, path: Sequence[str], key: str, deadline: float, version: bytes) -> None:
        self._record(RenewRecord(tuple(path), key, self._to_wall(deadline), version))

    def delete(self, path: Sequence[str], key: str, version: bytes) -> None:
        self._record(DeleteRecord(tuple(path), key, version))

    def delete_all(self, path: Sequence[str], version: bytes) -> None:
        self._record(DeleteAllRecord(tuple(path), version))

    def drop(self, path: Sequence[str], key: str, version: bytes) -> None:
        self._record(DropRecord(tuple(path), key, version))

    def _record(self, record: Record) -> None:
        self._pending += frame(_encode(record))
        self._records_since_snapshot += 1

    def wall_deadline(self, deadline: float) -> float | None:
        """A storage-clock deadline as a wall-clock instant (None: never)."""
        return None if deadline == NEVER else self._to_wall(deadline)

    def _to_wall(self, deadline: float) -> float:
        return deadline + self._wall_minus_clock()

    def _wall_minus_clock(self) -> float:
        return self._wall() - self._clock()

    def commit(self) -> None:
        """Write the queued records to the log (and fsync it under `always`). Call before answering.

        If the log cannot be written (disk full, I/O error), raises StoreUnavailable, and from
        then on `writable` refuses writes until the records still queued could be written; a
        commit meanwhile has nothing new to write and does nothing (reads go on being answered).
        """
        if self._failure is None:
            self._flush()

    def writable(self) -> None:
        """Raise StoreUnavailable while the log cannot be written; tries the queued records again first."""
        if self._failure is not None:
            self._flush()

    def _flush(self) -> None:
        """Write what is queued (and fsync under `always`); the one place the failure state changes.

        The log is healthy (`_failure` None) only once every queued record is written and, under
        `always`, fsynced. After a failure under `always` the log is first cut back to its last
        fsynced size and everything after it written again: a failed fsync may have dropped
        those pages, and a retried fsync would not say so.
        """
        if not self._pending and self._failure is None:
            return
        always = self.fsync_policy == "always"
        try:
            if always and self._failure is not None:
                os.ftruncate(self._log_fd, self._synced_size)
                self._pending[:0] = self._unsynced_records
                self._unsynced_records.clear()
            while self._pending:
                written = os.write(self._log_fd, self._pending)
                if always:
                    self._unsynced_records += self._pending[:written]
                del self._pending[:written]  # a partly written record goes on from where it stopped
            if always:
                os.fsync(self._log_fd)
                self._synced_size += len(self._unsynced_records)
                self._unsynced_records.clear()
        except OSError as error:
            self._failure = f"cannot write the log in {self.directory}: {error}"
            log.error("%s; writes are refused until it can be written", self._failure)
            raise StoreUnavailable(f"{self._failure}; the server refuses writes until it can") from None
        self._failure = None
        if not always:
            self._unsynced = True

    async def sync_forever(self, interval: float = 1.0) -> None:
        """The `everysec` policy: fsync the log once a second when it has unsynced writes."""
        while True:
            await asyncio.sleep(interval)
            if self._unsynced:
                self._unsynced = False
                async with self._fsyncing:  # a snapshot does not close this log under the fsync
                    try:
                        await _in_thread(os.fdatasync, self._clock_fd)
                        await _in_thread(os.fsync, self._log_fd)
                    except OSError as error:
                        log.error("cannot fsync the log in %s: %s", self.directory, error)
                        self._unsynced = True

    # Snapshots

    def log_bytes(self) -> int:
        """Bytes of the log files on disk (the writes not yet covered by a snapshot, about)."""
        total = 0
        for number in self._log_numbers():
            with contextlib.suppress(FileNotFoundError):  # deleted by a snapshot meanwhile
                total += self._log_path(number).stat().st_size
        return total

    def has_changes(self) -> bool:
        return self._records_since_snapshot > 0

    async def snapshot(self, storage: NamespacedStorage) -> int:
        """Write a snapshot of `storage` while it keeps serving; returns the entries written.

        Either the snapshot is complete and in place, or (on any error or
        cancellation) its temporary file is removed and the change count is
        restored, so that the next round tries again; the logs keep every write.
        """
        try:
            # Rotating with records unwritten would put the rest of a half-written one at the
            # start of the next log, where recovery would take it for damage.
            self._flush()
        except StoreUnavailable as error:
            raise PersistenceError(f"no snapshot while the log cannot be written: {error}") from None
        temporary = self.snapshot_temporary()
        old_fd, covered = self._log_fd, self._log_number
        pending = self._records_since_snapshot
        self._log_number += 1
        self._log_fd = os.open(
            self._log_path(self._log_number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        self._synced_size = 0
        self._records_since_snapshot = 0
        try:
            try:
                async with self._fsyncing:
                    await _in_thread(os.fsync, old_fd)  # it may hold a lot: not on the event loop
            finally:
                os.close(old_fd)
            written = await self._write_snapshot(storage, temporary)
            try:
                # Replacing frees the old snapshot's blocks: ~0.1 s for a large one, not on the event loop.
                await _in_thread(os.replace, temporary, self.directory / _SNAPSHOT)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        except BaseException:
            self._records_since_snapshot += pending  # still to be covered: the next round tries again
            raise
        await _in_thread(self._fsync_directory)
        self.last_snapshot = self._wall()
        for number in self._log_numbers():
            if number <= covered:
                await _in_thread(self._log_path(number).unlink)  # a large file takes ~0.1 s
        return written

    async def _write_snapshot(self, storage: NamespacedStorage, temporary: Path) -> int:
        """Write the entries to `temporary` a chunk at a time, serving requests in between.

        The file is fuzzy: each chunk holds its entries as they are when it is
        written, not as they all were at one instant. Replaying the logs from
        the rotation on makes it whole, since every write since then is in
        them and every record is idempotent. Namespaces created meanwhile are
        in the logs alone; those dropped meanwhile are dropped again by replay.
        """
        namespaces = list(storage.namespaces())
        written = 0
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, frame(_encode(SnapshotHeader("nestkv-snapshot", _FORMAT, self._log_number))))
            for path, node in namespaces:
                entries = node.entries
                keys = list(entries)  # the dict changes between chunks; its keys at this moment do not
                # A young list of a million keys would cost the garbage collector ~35 ms each time
                # it looked at it; frozen, the collector leaves it (and the store) alone meanwhile.
                gc.freeze()
                for start in range(0, len(keys), _SNAPSHOT_CHUNK):
                    wall_minus_clock = self._wall_minus_clock()
                    rows = []
                    for key in keys[start : start + _SNAPSHOT_CHUNK]:
                        stored = entries.get(key)
                        if stored is not None:  # else deleted since: the logs say so
                            deadline = deadline_of(stored)
                            wall = None if deadline == NEVER else deadline + wall_minus_clock
                            rows.append((key, value_of(stored), wall, version_of(stored)))
                    _write_all(fd, frame(_encode(VersionedChunk(path, rows))))
                    written += len(rows)
                    await asyncio.sleep(0)  # serve the requests that came in meanwhile
            if storage.tombstones is not None:
                buried, subtrees = storage.tombstones.versions()
                for start in range(0, max(len(buried), 1), _SNAPSHOT_CHUNK):
                    chunk = TombstoneChunk(
                        buried[start : start + _SNAPSHOT_CHUNK], subtrees if not start else []
                    )
                    _write_all(fd, frame(_encode(chunk)))
                    await asyncio.sleep(0)
            _write_all(fd, frame(_encode(SnapshotEnd(written))))
            await _in_thread(os.fsync, fd)
        except BaseException:
            os.unlink(temporary)  # cut short (an error, or the server stopping): nothing of it is left
            raise
        finally:
            os.close(fd)
            gc.unfreeze()
        return written

    async def snapshot_forever(self, storage: NamespacedStorage, interval: float) -> None:
        """Snapshot every `interval` seconds while something changed since the last complete one."""
        while True:
            await asyncio.sleep(interval)
            if self.has_changes():
                started = time.perf_counter()
                try:
                    entries = await self.snapshot(storage)
                except asyncio.CancelledError:
                    log.info("snapshot cut short by the server stopping; its file is removed")
                    raise
                except (PersistenceError, OSError) as error:  # the logs still hold everything
                    log.error("snapshot failed, will try again in %.1f s: %r", interval, error)
                    continue
                log.info("snapshot of %d entries written in %.2f s", entries, time.perf_counter() - started)

    def snapshot_temporary(self) -> Path:
        """Where the next snapshot is written before it is renamed into place.

        Recovery removes such a file left by a server that died while writing it.
        """
        return self.directory / f"{_SNAPSHOT}.{self._log_number}.tmp"

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _log_path(self, number: int) -> Path:
        return self.directory / f"log.{number}.msgpack"

    def _log_numbers(self) -> list[int]:
        numbers = []
        for entry in self.directory.iterdir():
            match = _LOG_NAME.match(entry.name)
            if match:
                numbers.append(int(match[1]))
        return sorted(numbers)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _in_thread(function: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call in a thread; if cancelled meanwhile, wait for it before giving up.

    The call may use a file descriptor that the caller closes on the way out,
    and a descriptor closed under a running call can be reused by another file.
    """
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def apply(storage: NamespacedStorage, record: Record, clock_minus_wall: float) -> None:
    """Merge one log record into `storage` (whose clock reads wall time + `clock_minus_wall`)."""
    # A deadline that passed while the server was down is applied all the same:
    # the entry is expired (invisible, reaped soon) unless a later renewal in
    # the log moves its deadline, as it did when the server ran.
    if isinstance(record, SetRecord):
        deadline = NEVER if record.deadline is None else record.deadline + clock_minus_wall
        storage.merge(record.path, record.key, record.version, record.value, deadline, make_room=False)
    elif isinstance(record, DeleteRecord):
        storage.merge(record.path, record.key, record.version)
    elif isinstance(record, DeleteAllRecord):
        storage.merge_subtree(record.path, record.version)
    elif isinstance(record, DropRecord):
        storage.discard(record.path, record.key, record.version)
    else:
        storage.renew_until(record.path, record.key, record.deadline + clock_minus_wall, record.version)
