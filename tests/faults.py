"""Fault injection: a cluster of real nodes behind proxies, a nemesis, writers and readers, a checker.

- Every node listens on a port of its own; the member list names a *proxy* in front of it
  (`TcpProxy`), which every client and every peer goes through. A node's own calls to its peers go
  out through an HTTP CONNECT proxy of its own (`ConnectProxy`, given to gRPC as `grpc_proxy`).
  Cutting a node off closes both: nothing reaches it and nothing leaves it, for clients and
  peers alike, while the process runs on.
- The nemesis faults one node at a time: kill -9 (and start it again on its data directory),
  SIGSTOP (and SIGCONT), cut off (and reconnect), SIGTERM (and start again); or two nodes at a
  time, cut from each other only while both reach the third (a partial partition: `split`).
  `FaultCluster.crash_back_to` kills a node and cuts its logs back to an earlier size (a machine
  lost under --fsync no), for a test that needs that.
- The workload: writers, each the only one writing its keys, every value unique; readers reading
  any key; half the clients route by the topology, half are pinned to one node. Every operation
  is recorded with its start, its end and its outcome.
- The checker (`check`), as Jepsen's set and register checkers: acknowledged writes lost, stale
  reads (a value older than a write acknowledged before the read began), failed writes whose
  value was seen (a write the client was told was not applied), and failed operations per
  fault window, on the faulted node's keys and on the others.
- Counters (`incrementer`, `check_counters`): tasks add 1 to shared keys; each key's final value
  must count every acknowledged increment and no more than those whose outcome is unknown, and
  no two acknowledged increments of a key may have answered the same sum (two copies answering
  for it at once, each from the same state).
- Racers (`racer`, `check_races`): tasks race `set_if_absent` on the same fresh keys, one key
  after the other; at most one may be told it stored its value, and the key must end holding it.
- Lockers (`locker`, `check_locks`): tasks take one of a few `Lock`s, hold it 20-80 ms and let it
  go; of two holders that each still held the lock when they let it go (the lock did not expire
  under them, nor was lost in a failover: the cases docs/client.md documents), neither may have
  taken it before the other began to let it go.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from nestkv.client import GrpcStore, LockError, StoreError, channel_options
from nestkv.wire.placement import Placement
from tests.clusterproc import free_ports
from tests.serverproc import ServerProcess

PATH = ("faults",)


class TcpProxy:
    """Forwards connections from `port` to `target_port` on 127.0.0.1; `cut` drops them all."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.cut = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await _pipe_both(self._open, reader, writer, up_reader, up_writer)

    def sever(self) -> None:
        """Drop every connection and refuse new ones until `heal`."""
        self.cut = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def heal(self) -> None:
        self.cut = False

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class ConnectProxy(TcpProxy):
    """An HTTP CONNECT proxy for one node's outgoing calls (gRPC's `grpc_proxy`); `block` cuts
    its calls to one port only."""

    def __init__(self, port: int) -> None:
        super().__init__(port, 0)
        self._blocked: set[int] = set()
        self._to: dict[asyncio.StreamWriter, int] = {}  # the port each connection goes to

    def block(self, port: int) -> None:
        """Drop the calls to `port` and refuse new ones until `unblock`."""
        self._blocked.add(port)
        for writer, target in list(self._to.items()):
            if target == port:
                writer.transport.abort()

    def unblock(self, port: int) -> None:
        self._blocked.discard(port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            target = head.split(b" ", 2)[1].decode()
            host, _, port = target.rpartition(":")
            if int(port) in self._blocked:
                raise OSError(f"{target} is cut off from this node")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, IndexError):
            writer.close()
            return
        if self.cut or int(port) in self._blocked:
            writer.close()
            up_writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._to[writer] = int(port)
        try:
            await _pipe_both(self._open, reader, writer, up_reader, up_writer)
        finally:
            self._to.pop(writer, None)


async def _pipe_both(
    open_: set[asyncio.StreamWriter],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    open_.update((writer, up_writer))

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()

    try:
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        open_.discard(writer)
        open_.discard(up_writer)


class FaultCluster:
    """`size` nodes with --replicas `replicas`, each behind a TcpProxy, calling out through a
    ConnectProxy; the member list names the proxies."""

    def __init__(self, directory: Path, size: int, *args: str, proxied: bool = True) -> None:
        """`proxied`: behind proxies (to cut nodes off); without, clients and peers call the nodes
        themselves, and the test process's CPU goes to the clients alone."""
        self.directory = directory
        self.members = [f"node-{n}" for n in range(size)]
        ports = free_ports(3 * size)
        self.public = dict(zip(self.members, ports[:size], strict=True))
        self.private = dict(zip(self.members, ports[size : 2 * size], strict=True))
        outgoing = dict(zip(self.members, ports[2 * size :], strict=True))
        self.inbound = {m: TcpProxy(self.public[m], self.private[m]) for m in self.members}
        self.outbound = {m: ConnectProxy(outgoing[m]) for m in self.members}
        self.args = args
        self.proxied = proxied
        if not proxied:
            self.public = self.private
        self.nodes: dict[str, ServerProcess] = {}
        self.members_file = directory / "members"
        self.members_file.write_text("".join(f"{m}=127.0.0.1:{self.public[m]}\n" for m in self.members))
        self.placement = Placement(self.members)

    def target(self, member: str) -> str:
        return f"127.0.0.1:{self.public[member]}"

    def _process(self, member: str) -> ServerProcess:
        data_dir = self.directory / member
        data_dir.mkdir(exist_ok=True)
        args = [
            "--port", str(self.private[member]), "--node-id", member,
            "--cluster", f"@{self.members_file}", "--data-dir", str(data_dir), *self.args,
        ]  # fmt: skip
        env = {"grpc_proxy": f"http://127.0.0.1:{self.outbound[member].port}", "no_grpc_proxy": ""}
        return ServerProcess(*args, env=env if self.proxied else {})

    async def start(self) -> None:
        for proxy in (*self.inbound.values(), *self.outbound.values()) if self.proxied else ():
            await proxy.start()
        for member in self.members:
            await self.start_node(member)
        for member in self.members:
            await self.caught_up(member)
        await asyncio.sleep(0.5)  # each has seen the others current (a few pings)

    async def start_node(self, member: str) -> None:
        self.nodes[member] = await asyncio.to_thread(self._process(member).start)

    async def caught_up(self, member: str) -> None:
        """Wait until `member` (started again) answers for its keys: its readiness says SERVING."""
        await self.nodes[member].ready()

    def signal(self, member: str, signum: int) -> None:
        os.kill(self.nodes[member].process.pid, signum)

    async def kill(self, member: str) -> None:
        self.signal(member, signal.SIGKILL)
        await asyncio.to_thread(self.nodes[member].process.wait)

    async def terminate(self, member: str) -> None:
        await asyncio.to_thread(self.nodes[member].stop)

    def cut(self, member: str) -> None:
        self.inbound[member].sever()
        self.outbound[member].sever()

    def heal(self, member: str) -> None:
        self.inbound[member].heal()
        self.outbound[member].heal()

    def split(self, one: str, other: str) -> None:
        """Cut `one` and `other` from each other only: each still reaches the rest, and clients
        reach both."""
        self.outbound[one].block(self.public[other])
        self.outbound[other].block(self.public[one])

    def join(self, one: str, other: str) -> None:
        self.outbound[one].unblock(self.public[other])
        self.outbound[other].unblock(self.public[one])

    def log_sizes(self, member: str) -> dict[Path, int]:
        """The size of each of `member`'s logs now (see `crash_back_to`)."""
        return {log: log.stat().st_size for log in (self.directory / member).glob("log.*.msgpack")}

    async def crash_back_to(self, member: str, sizes: dict[Path, int]) -> None:
        """kill -9 `member` and cut its logs back to `sizes` (from `log_sizes`): its machine lost
        what it had not written to disk since (with --fsync no, a crash of the machine may)."""
        await self.kill(member)
        for log in (self.directory / member).glob("log.*.msgpack"):
            if log not in sizes:
                log.unlink()
            elif log.stat().st_size > sizes[log]:
                os.truncate(log, sizes[log])

    async def close(self) -> None:
        for member, process in self.nodes.items():
            with contextlib.suppress(ProcessLookupError):
                self.signal(member, signal.SIGCONT)
            await asyncio.to_thread(process.stop)
        for proxy in (*self.inbound.values(), *self.outbound.values()) if self.proxied else ():
            await proxy.close()


# --- the history ---------------------------------------------------------------------------------


@dataclass
class Op:
    """One operation as a client saw it: `applied` False for a failure known not to have applied.
    A "lock" op is one holder's hold: `start` once it took the lock, `end` as it began to let it
    go, `ok` if it still held the lock then, `value` the lock's version (its fencing token)."""

    kind: str  # "set", "get", "increment", "set_if_absent" or "lock"
    via: str  # the node the client is pinned to; "" for a client that routes
    key: str
    value: str | None  # written, or read (None: not found), or the sum an increment answered
    start: float
    end: float = 0.0
    ok: bool = False
    applied: bool | None = None
    error: str = ""


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    faults: list[tuple[str, str, float, float]] = field(default_factory=list)  # kind, node, start, end
    final: dict[str, str | None] = field(default_factory=dict)  # each key's value once it is over


async def _run(store: GrpcStore, op: Op) -> None:
    """Run `op` and record its outcome (a set_if_absent that found the key held is not `ok`)."""
    try:
        if op.kind == "set":
            assert op.value is not None
            await store.set(op.key, op.value)
            op.applied = True
        elif op.kind == "increment":
            op.value = str(await store.increment(op.key))
            op.applied = True
        elif op.kind == "set_if_absent":
            assert op.value is not None
            op.applied = await store.set_if_absent(op.key, op.value)
            if not op.applied:
                op.error = "not stored: held already"
        else:
            found = await store.get(op.key)
            op.value = None if found is None else found.decode()
        op.ok = op.applied is not False
    except StoreError as error:
        op.applied = error.applied
        op.error = f"{type(error).__name__}: {error}"
    op.end = time.monotonic()


async def writer(
    client: tuple[str, GrpcStore], keys: Sequence[str], name: str, history: History, stop: asyncio.Event
) -> None:
    """Write unique values to `keys`, one at a time, until `stop`; `client`: (pinned to, store)."""
    via, store = client
    numbers = itertools.count()
    while not stop.is_set():
        for key in keys:
            op = Op("set", via, key, f"{name}-{next(numbers)}", time.monotonic())
            history.ops.append(op)
            await _run(store, op)
            if stop.is_set():
                return


async def reader(
    client: tuple[str, GrpcStore], keys: Sequence[str], history: History, stop: asyncio.Event
) -> None:
    """Read any of `keys` until `stop`; `client`: (pinned to, store)."""
    via, store = client
    chooser = random.Random(len(keys))
    while not stop.is_set():
        op = Op("get", via, chooser.choice(keys), None, time.monotonic())
        history.ops.append(op)
        await _run(store, op)


async def incrementer(
    client: tuple[str, GrpcStore], keys: Sequence[str], history: History, stop: asyncio.Event
) -> None:
    """Add 1 to any of `keys` until `stop`, recording each sum (as the op's value); `client`:
    (pinned to, store)."""
    via, store = client
    chooser = random.Random(id(history) + len(history.ops))
    while not stop.is_set():
        op = Op("increment", via, chooser.choice(keys), None, time.monotonic())
        history.ops.append(op)
        await _run(store, op)


def _summary(figures: str, *found: list[str]) -> str:
    """A checker's report: its figures, then the first five of each list of what it found."""
    return "\n".join([figures, *(line for lines in found for line in lines[:5])])


def _by_key(history: History, kind: str) -> dict[str, list[Op]]:
    """The finished operations of `kind`, by key, in the order they began."""
    by_key: dict[str, list[Op]] = {}
    for op in history.ops:
        if op.kind == kind and op.end:
            by_key.setdefault(op.key, []).append(op)
    return by_key


@dataclass
class CounterReport:
    acknowledged: int = 0
    unknown: int = 0
    lost: list[str] = field(default_factory=list)  # a final value under the acknowledged count
    extra: list[str] = field(default_factory=list)  # over it by more than the unknown outcomes
    duplicate_sums: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return _summary(
            f"acknowledged increments {self.acknowledged}, unknown outcome {self.unknown}, keys "
            f"short of their acknowledged increments {len(self.lost)}, over {len(self.extra)}, "
            f"acknowledged increments answered with a sum another had {len(self.duplicate_sums)}",
            self.lost,
            self.extra,
            self.duplicate_sums,
        )


def check_counters(history: History, final: dict[str, str | None]) -> CounterReport:
    """Each counter's final value against its increments (see the module)."""
    report = CounterReport()
    for key, ops in _by_key(history, "increment").items():
        acknowledged = [op for op in ops if op.ok]
        unknown = sum(not op.ok and op.applied is not False for op in ops)
        report.acknowledged += len(acknowledged)
        report.unknown += unknown
        held = int(final.get(key) or 0)
        if held < len(acknowledged):
            report.lost.append(f"lost: {key} holds {held}, after {len(acknowledged)} acknowledged increments")
        if held > len(acknowledged) + unknown:
            report.extra.append(
                f"extra: {key} holds {held}: {len(acknowledged)} acknowledged, {unknown} unknown"
            )
        sums: dict[str, Op] = {}
        for op in acknowledged:
            assert op.value is not None
            first = sums.get(op.value)
            if first is not None:
                report.duplicate_sums.append(
                    f"duplicate sum: {key} = {op.value} answered twice, via {first.via or 'routing'} "
                    f"at {first.end:.3f} and via {op.via or 'routing'} at {op.end:.3f}"
                )
            sums[op.value] = op
    return report


async def racer(client: tuple[str, GrpcStore], name: str, history: History, stop: asyncio.Event) -> None:
    """`set_if_absent` keys `race-0`, `race-1`... in turn to a value naming this racer, until
    `stop` (racers started together race on the same keys); an op's `ok` says it was told it
    stored its value; `client`: (pinned to, store)."""
    via, store = client
    for number in itertools.count():
        if stop.is_set():
            return
        key = f"race-{number}"
        op = Op("set_if_absent", via, key, f"{name}:{key}", time.monotonic())
        history.ops.append(op)
        await _run(store, op)


@dataclass
class RaceReport:
    keys: int = 0
    won: int = 0
    unknown: int = 0
    two_winners: list[str] = field(default_factory=list)
    winner_lost: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return _summary(
            f"keys raced {self.keys}, won by an acknowledged set_if_absent {self.won}, outcomes "
            f"unknown {self.unknown}, keys with two winners {len(self.two_winners)}, keys not "
            f"holding their winner's value {len(self.winner_lost)}",
            self.two_winners,
            self.winner_lost,
        )


def check_races(history: History, final: dict[str, str | None]) -> RaceReport:
    """One winner per key, and the key holds the winner's value (see the module)."""
    report = RaceReport()
    for key, ops in _by_key(history, "set_if_absent").items():
        report.keys += 1
        winners = [op for op in ops if op.ok]
        report.unknown += sum(not op.ok and op.applied is None for op in ops)
        if len(winners) > 1:
            report.two_winners.append(
                f"two winners: {key}: " + ", ".join(f"{op.value} via {op.via or 'routing'}" for op in winners)
            )
        if winners:
            report.won += 1
            if final.get(key) not in {op.value for op in winners}:
                report.winner_lost.append(
                    f"winner lost: {key} holds {final.get(key)!r}, {winners[0].value} won"
                )
    return report


async def locker(
    client: tuple[str, GrpcStore], names: Sequence[str], history: History, stop: asyncio.Event
) -> None:
    """Take any of the locks `names` (expiring in 3 s), hold it 20-80 ms and let it go, until
    `stop`, recording each hold as a "lock" op (see Op); `client`: (pinned to, store)."""
    via, store = client
    chooser = random.Random(id(history) + len(history.ops))
    while not stop.is_set():
        name = chooser.choice(names)
        lock = store.lock(name, expires_in=3.0, blocking_timeout=1.0, sleep=0.01)
        try:
            if not await lock.acquire():
                continue
        except StoreError:
            continue  # not taken, or its outcome unknown: it expires by itself
        assert lock.version is not None
        op = Op("lock", via, name, lock.version.hex(), time.monotonic())
        await asyncio.sleep(chooser.uniform(0.02, 0.08))
        op.end = time.monotonic()
        history.ops.append(op)
        try:
            await lock.release()
            op.ok = True
        except (LockError, StoreError) as error:
            op.error = f"{type(error).__name__}: {error}"


@dataclass
class LockReport:
    holds: int = 0
    let_go_held: int = 0
    overlaps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return _summary(
            f"holds {self.holds}, still held when let go {self.let_go_held}, overlapping holds "
            f"of two holders that still held the lock when they let it go {len(self.overlaps)}",
            self.overlaps,
        )


def check_locks(history: History) -> LockReport:
    """No two holds of a lock overlap, of holders that still held it when they let it go."""
    report = LockReport()
    for name, holds in _by_key(history, "lock").items():
        report.holds += len(holds)
        kept = sorted((op for op in holds if op.ok), key=lambda op: op.start)
        report.let_go_held += len(kept)
        for before, after in itertools.pairwise(kept):
            if after.start < before.end:
                report.overlaps.append(
                    f"overlap: {name} held via {before.via or 'routing'} {before.start:.3f}-{before.end:.3f} "
                    f"(version {before.value}) and via {after.via or 'routing'} from {after.start:.3f} "
                    f"(version {after.value})"
                )
    return report


# --- the nemesis ---------------------------------------------------------------------------------

FAULTS = ("kill", "pause", "cut", "restart")


async def nemesis(
    cluster: FaultCluster,
    history: History,
    rounds: int,
    fault_seconds: float,
    calm_seconds: float,
    kinds: Sequence[str] = FAULTS,
) -> None:
    """`rounds` faults of `kinds` in turn (FAULTS, or "split"), one node at a time in turn (a split
    cuts it from the next), each `fault_seconds` long, `calm_seconds` apart."""
    for number in range(rounds):
        await asyncio.sleep(calm_seconds)
        kind = kinds[number % len(kinds)]
        member = cluster.members[number % len(cluster.members)]
        start = time.monotonic()
        if kind == "kill":
            await cluster.kill(member)
            await asyncio.sleep(fault_seconds)
            await cluster.start_node(member)
        elif kind == "pause":
            cluster.signal(member, signal.SIGSTOP)
            await asyncio.sleep(fault_seconds)
            cluster.signal(member, signal.SIGCONT)
        elif kind == "cut":
            cluster.cut(member)
            await asyncio.sleep(fault_seconds)
            cluster.heal(member)
        elif kind == "split":
            other = cluster.members[(number + 1) % len(cluster.members)]
            cluster.split(member, other)
            await asyncio.sleep(fault_seconds)
            cluster.join(member, other)
            member = f"{member}|{other}"
        else:
            await cluster.terminate(member)
            await cluster.start_node(member)
        history.faults.append((kind, member, start, time.monotonic()))
    await asyncio.sleep(calm_seconds)


# --- the checker ---------------------------------------------------------------------------------


@dataclass
class Window:
    """The operations that began during one fault: on the faulted node's keys, and on the others."""

    fault: str
    node: str
    at: float  # seconds into the run
    faulted: int
    faulted_failed: int
    other: int
    other_failed: int
    longest_gap: float  # seconds without a successful operation on the faulted node's keys
    errors: list[str]  # the first few distinct failures, and through which client

    def __str__(self) -> str:
        return (
            f"  {self.fault} {self.node} at {self.at:.2f} s: faulted node's keys "
            f"{self.faulted_failed}/{self.faulted} failed ({_rate(self.faulted_failed, self.faulted)}), "
            f"others {self.other_failed}/{self.other} ({_rate(self.other_failed, self.other)}); "
            f"longest wait for a success on its keys {self.longest_gap:.2f} s"
        ) + "".join(f"\n    {error}" for error in self.errors)


def _rate(part: int, whole: int) -> str:
    return f"{part / max(whole, 1):.2%}"


@dataclass
class Report:
    writes_acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    failed_seen: list[str] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)

    def summary(self) -> str:
        figures = [
            f"acknowledged writes {self.writes_acknowledged}, lost {len(self.lost)}, stale reads "
            f"{len(self.stale)}, failed writes seen {len(self.failed_seen)}",
            *(str(window) for window in self.windows),
        ]
        return _summary("\n".join(figures), self.lost, self.stale, self.failed_seen)


def check(history: History, final: dict[str, str | None], placement: Placement) -> Report:
    """Lost writes, stale reads and failed writes seen, and failures per fault window.

    A key is written by one writer, one write after the other: its writes' order is their
    order in time, and the value it holds must be that of its last write that may have applied.
    """
    report = Report()
    writes = _by_key(history, "set")
    index = {(op.key, op.value): n for key_writes in writes.values() for n, op in enumerate(key_writes)}

    # A key's writes follow one another: their ends are in order, and bisect finds the last
    # acknowledged before a moment.
    acknowledged = {
        key: ([op.end for op in key_writes if op.ok], [n for n, op in enumerate(key_writes) if op.ok])
        for key, key_writes in writes.items()
    }

    def last_acknowledged_before(key: str, moment: float) -> int:
        ends, positions = acknowledged.get(key, ([], []))
        count = bisect.bisect_left(ends, moment)
        return positions[count - 1] if count else -1

    for key, key_writes in writes.items():
        report.writes_acknowledged += sum(op.ok for op in key_writes)
        last = last_acknowledged_before(key, float("inf"))
        held = final.get(key)
        n = index.get((key, held), -1) if held is not None else -1
        if n < last:
            report.lost.append(
                f"lost: {key} holds {held!r}, its write {key_writes[last].value!r} was acknowledged"
            )
        if held is not None and n >= 0 and key_writes[n].applied is False:
            report.failed_seen.append(f"failed write won: {key} holds {held!r}: {key_writes[n].error}")
    t0 = history.ops[0].start if history.ops else 0.0
    for op in history.ops:
        if op.kind != "get" or not op.ok:
            continue
        n = index.get((op.key, op.value), -1) if op.value is not None else -1
        must = last_acknowledged_before(op.key, op.start)
        if n < must:
            report.stale.append(
                f"stale read of {op.key} (copies {', '.join(placement.ranked(PATH, op.key)[:2])}) "
                f"via {op.via or 'routing'} at {op.start - t0:.2f} s: {op.value!r}, after "
                f"{writes[op.key][must].value!r} was acknowledged at {writes[op.key][must].end - t0:.2f} s"
            )
        if n >= 0 and writes[op.key][n].applied is False:
            report.failed_seen.append(
                f"failed write read: {op.key} = {op.value!r}: {writes[op.key][n].error}"
            )
    for kind, member, start, end in history.faults:
        # A client pinned to the faulted node has nowhere else to go: its failures are its own.
        window = [op for op in history.ops if op.end and start <= op.start <= end and op.via != member]
        faulted = [op for op in window if placement.owner(PATH, op.key) == member]
        other = [op for op in window if placement.owner(PATH, op.key) != member]
        faulted_failed = sum(not op.ok for op in faulted)
        other_failed = sum(not op.ok for op in other)
        errors = sorted(
            {f"{op.kind} via {op.via or 'routing'}: {op.error[:100]}" for op in window if not op.ok}
        )[:5]
        successes = sorted(op.end for op in faulted if op.ok)
        gaps = [later - earlier for earlier, later in itertools.pairwise([start, *successes, end])]
        report.windows.append(
            Window(
                kind,
                member,
                start - t0,
                len(faulted),
                faulted_failed,
                len(other),
                other_failed,
                max(gaps),
                errors,
            )
        )
    return report


async def final_values(cluster: FaultCluster, keys: Sequence[str]) -> dict[str, str | None]:
    """Every key's value once the faults are over, read through the topology."""
    async with GrpcStore.with_client(cluster.target(cluster.members[0])) as root:
        values = await root.with_namespace(PATH[0]).get_many(keys)
    return {key: None if value is None else value.decode() for key, value in zip(keys, values, strict=True)}


@contextlib.asynccontextmanager
async def pinned(target: str, seconds: float) -> AsyncIterator[GrpcStore]:
    """A store that sends everything to the node at `target` (it forwards what it does not serve)."""
    async with grpc.aio.insecure_channel(target, options=channel_options(4 * 1024 * 1024)) as channel:
        store = GrpcStore(channel, timeout=seconds)
        yield store.with_namespace(PATH[0])
        await store.close()


@contextlib.asynccontextmanager
async def routed(target: str, seconds: float) -> AsyncIterator[GrpcStore]:
    """A store that routes each operation by the topology it reads from `target`."""
    async with GrpcStore.with_client(target, timeout=seconds) as store:
        yield store.with_namespace(PATH[0])
