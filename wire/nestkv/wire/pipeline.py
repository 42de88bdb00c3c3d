"""Coalescing: the operations that concurrent tasks issue travel together in Pipeline batches.

One `Pipeline` per channel and event loop keeps one Pipeline stream open.
An operation joins the batch being filled and the batch is written on the
next turn of the event loop, never on a timer: a lone operation waits for
nothing, and operations issued in the same moment share one message. A batch
closes at `max_batch_size` operations (or about `max_batch_bytes` of
payload); at most `max_batches_in_flight` batches await their results, and
when as many again are waiting to be sent, callers wait for room
(back-pressure) in a queue, in the order they came, each woken once when
room appears for it.

Deadlines: every operation has its own, `timeout` seconds from the call. A
caller still waiting for room when it passes fails with StoreTimeoutError
and is never sent; so does an operation waiting for its result. An
operation that timed out is not sent again by a retry. When an operation on
the stream times out and the stream has answered nothing for as long, the
stream is taken for dead (a stuck server, a half-open connection): it is
torn down and its unanswered operations go the way of a broken stream.
The channel's keepalive pings (see `channel_options`) find a dead
connection even when nothing is waiting on it, so that gRPC opens a new one.

Connecting: given `ready` (GrpcStore does), a stream is opened only once the
channel is connected. Meanwhile operations wait, within their deadline, for a
server that refuses connections (one restarting), and fail UNAVAILABLE, not
applied, with gRPC's reason, if it is not back in time. A stream the server
ends on purpose says so in its last message (PipelineResponse.ending): what it
did not answer never ran, and all goes again, even what is not idempotent.

Failures: an operation the server rejects fails alone, with the error of its
status. A get the server deferred (its batch's answer reached its bound: not
run) is sent again in a later batch, unseen by its caller. A stream that
breaks with UNAVAILABLE or CANCELLED, that the server ends (it is shutting
down), or that is torn down as dead, is opened again
with backoff and the unanswered operations are sent again (every operation
is idempotent); after `_MAX_ATTEMPTS` streams in a row fail so, every
waiting operation fails with StoreUnavailableError. Any other stream failure
fails the batches that were on it. An unexpected error in the pipeline
itself (a bug, a malformed answer) fails every operation it holds, and the
next operation starts afresh. A caller that is cancelled leaves the others
untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from nestkv.v1 import store_pb2 as pb
from nestkv.wire.errors import (
    StoreError,
    StoreProtocolError,
    StoreTimeoutError,
    StoreUnavailableError,
    error_from_result,
    error_from_rpc,
    mark_outcome_unknown,
)
from nestkv.wire.operations import idempotent

DEFAULT_MAX_BATCH_SIZE = 512
MAX_BATCH_SIZE = 10_000
"""The most operations a batch may hold: the server's default --max-batch-operations."""
DEFAULT_MAX_BATCHES_IN_FLIGHT = 4
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
CONNECT_WAIT = 10.0
"""Seconds operations without a deadline wait for a server that refuses connections (given `ready`)."""

_MAX_ATTEMPTS = 5
_PROBE_AGAIN = 0.5  # seconds between two looks at why a channel does not connect
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# What grpc.aio reports when a write fails inside gRPC core, as when the
# server ends the stream while a batch is being written: nothing was delivered.
_FAILED_IN_CORE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


_ENDED = StoreUnavailableError(
    "UNAVAILABLE: the server ended the stream", "UNAVAILABLE", reason="NOT_SERVING", applied=False
)
"""Why a stream ended cleanly: the server answered every batch it read first (it stops, or sends
its callers elsewhere), so the batches it did not answer never ran, and all go again."""

EARLIER_ATTEMPT = "an earlier attempt was sent: its outcome is unknown"
NOT_SENT_AGAIN = "the stream broke after this operation was sent, and it is not sent again (not idempotent)"


def _cancel_if_cancelled(moved: asyncio.Future[Any], caller: asyncio.Future[Any]) -> None:
    """A caller that stopped waiting: its operation, moved to another pipeline, is not sent."""
    if caller.cancelled():
        moved.cancel()


def _follow(caller: asyncio.Future[Any], sent: bool, result: asyncio.Future[Any]) -> None:
    """Give `caller` the outcome of `result`, its operation sent again elsewhere (`sent`: it was
    sent before: a failure that says it was not applied there leaves its outcome unknown)."""
    if caller.done():
        return
    if result.cancelled():
        caller.cancel()
        return
    error = result.exception()
    if error is None:
        caller.set_result(result.result())
        return
    if sent and isinstance(error, StoreError) and error.applied is False:
        error = error.outcome_unknown(EARLIER_ATTEMPT)
    caller.set_exception(error)


def backoff(attempt: int) -> float:
    """Seconds to wait before opening a stream again after `attempt` streams in a row failed."""
    return float(min(_FIRST_BACKOFF * 2 ** (attempt - 1), _MAX_BACKOFF))


class _Batch:
    """Operations sent in one PipelineRequest, with their callers' futures and deadlines, in order."""

    __slots__ = (
        "answered",
        "attempts",
        "deadlines",
        "futures",
        "message",
        "payload",
        "sent_at",
        "timer",
        "timer_at",
    )

    def __init__(self, batch_id: int, topology_version: str = "") -> None:
        # Answers are matched by id: one waiting on a slow node holds back no other batch.
        self.message = pb.PipelineRequest(id=batch_id, topology_version=topology_version, any_order=True)
        self.futures: list[asyncio.Future[Any]] = []
        self.deadlines: list[float] = []  # loop time; empty when operations have no deadline
        self.payload = 0
        self.answered = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.sent_at = 0.0  # loop time it was last written to a stream
        self.attempts = 0  # times it was written to a stream

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def fail(self, error: BaseException) -> None:
        self.stop_timer()
        if self.sent_at and isinstance(error, StoreError) and error.applied is False:
            # The last attempt never reached a server, but an earlier one was written to a stream.
            error = error.outcome_unknown(EARLIER_ATTEMPT)
        for future in self.futures:
            if not future.done():
                future.set_exception(error)

    def fail_due(self, now: float, error: BaseException) -> float | None:
        """Fail the operations whose deadline has come; the earliest deadline still pending, if any."""
        earliest = None
        for future, deadline in zip(self.futures, self.deadlines, strict=True):
            if future.done():
                continue
            if deadline <= now:
                future.set_exception(error)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        return earliest

    def fail_not_idempotent(self, error: StoreError) -> None:
        """Fail the operations that must not run twice (nestkv.wire.operations.idempotent): this
        batch was sent, and the stream broke before their answers came (`error`): their outcome
        is unknown."""
        for index, future in enumerate(self.futures):
            if not future.done() and not idempotent(self.message.operations[index]):
                future.set_exception(error.outcome_unknown(f"{NOT_SENT_AGAIN}: its outcome is unknown"))

    def settled(self) -> bool:
        return all(future.done() for future in self.futures)

    def unsettled(self) -> _Batch:
        """This batch for sending again: only the operations whose callers still wait, none answered."""
        self.answered = 0
        if not any(future.done() for future in self.futures):
            return self
        again = _Batch(self.message.id, self.message.topology_version)
        for index, future in enumerate(self.futures):
            if not future.done():
                again.message.operations.append(self.message.operations[index])
                again.futures.append(future)
                if self.deadlines:
                    again.deadlines.append(self.deadlines[index])
        again.payload = self.payload
        again.sent_at = self.sent_at
        again.attempts = self.attempts
        return again


class Pipeline:
    """Sends the operations issued in one event loop over one Pipeline stream, coalesced into batches."""

    __slots__ = (
        "_admission",
        "_admission_deadlines",
        "_admission_timer",
        "_admitted",
        "_broken_at",
        "_connecting",
        "_driver",
        "_failures",
        "_last_answer",
        "_loop",
        "_max_batch_bytes",
        "_max_batch_size",
        "_max_in_flight",
        "_next_id",
        "_not_connected",
        "_on_news",
        "_open_stream",
        "_raise_errors",
        "_reached",
        "_ready",
        "_sent",
        "_stalled",
        "_timeout",
        "_topology_version",
        "_waiting",
        "_wakeup",
        "reroute",
        "wakeups",
    )

    def __init__(
        self,
        open_stream: Callable[[], Any],
        *,
        timeout: float | None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        topology_version: Callable[[], str] | None = None,
        on_news: Callable[[pb.PipelineResponse], None] | None = None,
        raise_errors: bool = True,
        ready: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """`open_stream()` opens a Pipeline call; `timeout` is each operation's, in seconds.

        `topology_version()`, if given, is sent with every batch: the cluster topology its
        operations were routed by; `on_news(response)` is called with a node's answer when it
        says the batch's version is stale, or names members down. With `raise_errors` (the
        default) an operation's error fails its future with a StoreError; without, the error is
        its result (a cluster node forwarding, which passes a peer's error on as it came).
        `ready()`, if given, returns once the channel is connected (`channel_ready`): a stream is
        opened only then, so that operations wait for a server that is down (restarting) within
        their deadline, and fail "not applied" if it does not come back in time, instead of
        failing as soon as it refuses a connection (unless `reroute` may send them elsewhere).
        """
        self._open_stream = open_stream
        self._topology_version = topology_version
        self._on_news = on_news
        self._raise_errors = raise_errors
        self._ready = ready
        self._connecting = False  # waiting for the channel to connect (`ready`)
        self._reached = False  # the stream open now reached a server: batches may be written to it
        self._not_connected = ""  # why it does not, as gRPC last said
        self._timeout = timeout
        self._max_batch_size = max_batch_size
        self._max_in_flight = max_batches_in_flight
        self._max_batch_bytes = max_batch_bytes
        self._loop = asyncio.get_running_loop()
        self._waiting: deque[_Batch] = deque()  # not sent yet; the last one may still take operations
        self._sent: deque[_Batch] = deque()  # on the stream, oldest first, awaiting results
        self._wakeup = asyncio.Event()  # for the writer: a batch to send, or room on the stream
        self._stalled = asyncio.Event()  # the stream answered nothing while an operation timed out
        self._last_answer = 0.0
        self._admission: deque[asyncio.Future[None]] = deque()  # callers waiting for room, in order
        # Their deadlines, in the same order (when there is a timeout): every operation of a pipeline
        # has the same timeout, so the first in line is always the first to time out: one timer serves.
        self._admission_deadlines: deque[float] = deque()
        self._admission_timer: asyncio.TimerHandle | None = None
        self._admitted = 0  # callers woken for room that have not added their operation yet
        self._next_id = 0
        self._failures = 0  # streams in a row that broke before answering anything
        self._broken_at = 0.0  # loop time a stream last broke, until one answers again
        self._driver: asyncio.Task[None] | None = None
        self.wakeups = 0
        """Callers woken from waiting for room, in all: one per caller that waited."""
        self.reroute: Callable[[pb.Operation], Pipeline | None] | None = None
        """Given, the pipeline that takes an operation this one's broken stream holds (another
        copy of its key), None: it stays here (see `_hand_over`)."""

    def deadline(self) -> float | None:
        """The deadline (loop time) of an operation issued now; None without a timeout."""
        return None if self._timeout is None else self._loop.time() + self._timeout

    def add(
        self, payload: int, deadline: float | None, *, waited: bool = False, alone: bool = False
    ) -> tuple[pb.Operation, asyncio.Future[Any]]:
        """A new operation in the batch being filled, and the future of its OperationResult.

        The caller fills the operation in at once, before it awaits anything:
        the batch is sent on the next turn of the loop. `payload` is its size
        in bytes (key and value), for closing batches that grow too large;
        `deadline` (from `deadline()`) is when it fails with StoreTimeoutError;
        `waited` says the caller's turn came in line (`line_up`); `alone`, that it opens a batch
        of its own.
        """
        if waited:
            self._admitted -= 1
        batch = self._waiting[-1] if self._waiting else None
        if (
            batch is None
            or alone
            or len(batch.futures) >= self._max_batch_size
            or (batch.payload + payload > self._max_batch_bytes and batch.futures)
        ):
            self._next_id += 1
            batch = _Batch(self._next_id, self._topology_version() if self._topology_version else "")
            self._waiting.append(batch)
        future = self._loop.create_future()
        batch.futures.append(future)
        batch.payload += payload
        if deadline is not None:
            batch.deadlines.append(deadline)
            if batch.timer is None or deadline < batch.timer_at:
                self._arm(batch, deadline)
        self._wakeup.set()
        if self._driver is None:
            self._driver = self._loop.create_task(self._drive())
        return batch.message.operations.add(), future

    def give_up_if_silent(self, seconds: float) -> None:
        """Another node says this one is down: if the stream has answered nothing for `seconds`
        while it holds operations sent, take it for dead now, as when one of them times out (the
        ones that are not idempotent fail, their outcome unknown; the others go again, to the
        key's next copy if `reroute` gives one), and keep away from it while it stays silent."""
        if self._broken_at:
            self._broken_at = self._loop.time()
        if self.silent_for() >= seconds:
            self._stalled.set()

    def silent_for(self) -> float:
        """Seconds the stream has answered nothing while it holds operations sent (0: none held)."""
        if not self._sent:
            return 0.0
        return self._loop.time() - max(self._last_answer, self._sent[0].sent_at)

    def broke_lately(self, seconds: float) -> bool:
        """Whether a stream broke in the last `seconds` and none has answered since (a router
        sends elsewhere meanwhile, where it can)."""
        return bool(self._broken_at) and self._loop.time() - self._broken_at < seconds

    def has_room(self) -> bool:
        """Whether an operation may be added now, ahead of nobody: no caller in line, batches few."""
        return not self._admission and len(self._waiting) <= self._max_in_flight

    def line_up(self, deadline: float | None) -> asyncio.Future[None]:
        """A place in line for room to add an operation: a future done when it is this caller's turn.

        It fails with StoreTimeoutError if `deadline` passes first. Await it, then call `add`
        with `waited=True` without awaiting anything in between; if the await raises, call
        `leave_line`. (A future and a deadline per caller, and no coroutine of its own: with
        100,000 callers in line, every object each one holds is one more the garbage
        collector walks.)
        """
        turn: asyncio.Future[None] = self._loop.create_future()
        self._admission.append(turn)
        if deadline is not None:
            self._admission_deadlines.append(deadline)
            if self._admission_timer is None:
                self._admission_timer = self._loop.call_at(deadline, self._expire_admission)
        self._admit()
        return turn

    def leave_line(self, turn: asyncio.Future[None]) -> None:
        """Give up a place in line (the caller timed out or was cancelled); a turn given goes on."""
        if turn.done() and not turn.cancelled() and turn.exception() is None:
            self._admitted -= 1
            self._admit()
        else:
            turn.cancel()  # left in line, skipped when it comes first

    def _expire_admission(self) -> None:
        """Fail the callers in line whose deadline has come (the first in line come first)."""
        self._admission_timer = None
        queue, deadlines = self._admission, self._admission_deadlines
        now = self._loop.time()
        while deadlines and deadlines[0] <= now:
            deadlines.popleft()
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_exception(
                    self._unreachable(f" within {self._timeout} s")
                    if self._connecting  # no room because nothing can be sent
                    else StoreTimeoutError(
                        f"DEADLINE_EXCEEDED: no room to send within {self._timeout} s "
                        f"({len(queue)} operations waiting behind)",
                        "DEADLINE_EXCEEDED",
                        reason="DEADLINE_EXCEEDED",
                        applied=False,
                    )
                )
        if deadlines:
            self._admission_timer = self._loop.call_at(deadlines[0], self._expire_admission)

    def _admit(self) -> None:
        """Wake the first callers in line, as many as the batches not yet sent have room for."""
        room = (self._max_in_flight + 1 - len(self._waiting)) * self._max_batch_size - self._admitted
        queue, deadlines = self._admission, self._admission_deadlines
        while queue and room > 0:
            waiter = queue.popleft()
            if deadlines:
                deadlines.popleft()
            if waiter.done():  # it gave up: timed out or cancelled
                continue
            waiter.set_result(None)
            self._admitted += 1
            self.wakeups += 1
            room -= 1
        if not queue and self._admission_timer is not None:
            self._admission_timer.cancel()
            self._admission_timer = None

    async def close(self) -> None:
        """Stop the stream; operations still waiting, and callers waiting for room, fail."""
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        # Not applied where never sent; a batch sent makes it unknown (_Batch.fail).
        closed = StoreUnavailableError(
            "CANCELLED: the store was closed", "CANCELLED", reason="STORE_CLOSED", applied=False
        )
        # The line first: failing the batches makes room, which must not let anyone in any more.
        while self._admission:
            waiter = self._admission.popleft()
            if not waiter.done():
                waiter.set_exception(closed)
        self._admission_deadlines.clear()
        if self._admission_timer is not None:
            self._admission_timer.cancel()
            self._admission_timer = None
        self._fail_all(closed)

    def _arm(self, batch: _Batch, deadline: float) -> None:
        batch.stop_timer()
        batch.timer_at = deadline
        batch.timer = self._loop.call_at(deadline, self._expire, batch)

    def _expire(self, batch: _Batch) -> None:
        batch.timer = None
        now = self._loop.time()
        error: StoreError
        if self._connecting:  # waiting to be sent (again): the server refuses connections
            error = self._unreachable(f" within {self._timeout} s", sent=bool(batch.sent_at))
        elif batch.sent_at:
            error = StoreTimeoutError(
                f"DEADLINE_EXCEEDED: no answer within {self._timeout} s",
                "DEADLINE_EXCEEDED",
                reason="DEADLINE_EXCEEDED",
                applied=None,
            )
        else:  # never written to a stream: no room on it in time
            error = StoreTimeoutError(
                f"DEADLINE_EXCEEDED: not sent within {self._timeout} s (no room on the stream): not applied",
                "DEADLINE_EXCEEDED",
                reason="DEADLINE_EXCEEDED",
                applied=False,
            )
        earliest = batch.fail_due(now, error)
        if earliest is not None:
            self._arm(batch, earliest)
        assert self._timeout is not None  # only operations with a deadline arm a timer
        if batch in self._sent:
            # Silent since the oldest unanswered batch went out (an idle stream is not silent), and
            # for long enough that this is no operation admitted just before its deadline.
            silent_since = max(self._last_answer, self._sent[0].sent_at)
            if now - silent_since >= self._timeout / 2:
                self._stalled.set()

    async def _drive(self) -> None:
        """Keep a stream open while there is work, opening it again after failures."""
        self._failures = 0
        try:
            while self._waiting or self._sent:
                if self._ready is not None and self.reroute is None and not await self._connected():
                    continue
                error, retry = await self._run_stream()
                if not retry:
                    self._fail_sent(error)
                    continue
                self._failures += 1
                self._broken_at = self._loop.time()
                self._resend_unanswered(error)
                if self.reroute is not None:
                    self._hand_over(self.reroute)
                if self._failures >= _MAX_ATTEMPTS:
                    self._fail_all(error)
                    continue
                await asyncio.sleep(backoff(self._failures))
        except Exception as error:  # a bug or a malformed answer: never strand the operations held
            self._fail_all(
                StoreProtocolError(
                    f"INTERNAL: the client's pipeline failed: {error!r}",
                    "INTERNAL",
                    reason="INTERNAL",
                    applied=None,
                )
            )
        finally:
            self._driver = None

    async def _connected(self) -> bool:
        """Wait for the channel to connect, until the first deadline of the operations waiting
        (their timers fail them then: never sent, not applied), or CONNECT_WAIT for operations
        without one; whether it connected."""
        assert self._ready is not None
        settled = [batch for batch in self._waiting if batch.settled()]  # timed out meanwhile
        if settled:
            for batch in settled:
                batch.stop_timer()
            self._waiting = deque(batch for batch in self._waiting if not batch.settled())
            self._admit()
            if not self._waiting:
                return False
        deadlines = [min(batch.deadlines) for batch in self._waiting if batch.deadlines]
        # Just after the first deadline: its timer fails its operations first.
        wait = min(deadlines) - self._loop.time() + 0.001 if deadlines else CONNECT_WAIT
        self._connecting = True
        self._not_connected = ""
        try:
            async with asyncio.timeout(max(wait, 0.001)):
                await self._wait_ready()
        except TimeoutError:
            if not deadlines:
                self._fail_all(self._unreachable(f" in {CONNECT_WAIT:g} s"))
            return False
        finally:
            self._connecting = False
        return True

    async def _wait_ready(self) -> None:
        """`ready()`, learning meanwhile why the channel does not connect (a refused connection, a
        certificate not trusted): a stream opened while it cannot fails at once with gRPC's
        reason. Nothing is ever written to that stream: no operation goes on it."""
        assert self._ready is not None
        ready: asyncio.Future[Any] = asyncio.ensure_future(self._ready())
        try:
            while not ready.done():
                probe = self._open_stream()
                reading = self._loop.create_task(probe.read())
                try:
                    await asyncio.wait({ready, reading}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    reading.cancel()
                    probe.cancel()
                failure = reading.exception() if reading.done() and not reading.cancelled() else None
                if isinstance(failure, grpc.aio.AioRpcError):
                    self._not_connected = f"{failure.code().name}: {failure.details()}"
                if not ready.done():  # the probe is over, whatever ended it: look again later
                    await asyncio.wait({ready}, timeout=_PROBE_AGAIN)
            await ready
        finally:
            ready.cancel()

    def _unreachable(self, within: str, *, sent: bool = False) -> StoreUnavailableError:
        """The error of an operation that waited for the channel to connect `within` in vain: not
        applied, unless it was `sent` on a stream before (then its outcome is unknown)."""
        why = f" ({self._not_connected})" if self._not_connected else ""
        unknown = f"; {EARLIER_ATTEMPT}" if sent else ": not applied"
        return StoreUnavailableError(
            f"UNAVAILABLE: could not connect to the server{within}{why}{unknown}",
            "UNAVAILABLE",
            reason="UNREACHABLE",
            applied=None if sent else False,
        )

    async def _run_stream(self) -> tuple[StoreError, bool]:
        """Run one stream until it ends; why it ended and whether its unanswered operations go again."""
        call = self._open_stream()
        self._reached = False
        self._stalled.clear()
        self._last_answer = self._loop.time()
        reader = self._loop.create_task(self._read(call))
        writer = self._loop.create_task(self._write(call))
        stalled = self._loop.create_task(self._stalled.wait())
        try:
            pending = {reader, writer, stalled}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    return reader.result()
                if stalled in done:
                    return StoreUnavailableError(
                        f"UNAVAILABLE: the stream answered nothing for {self._timeout} s; "
                        "it was closed and a new one opened",
                        "UNAVAILABLE",
                        reason="CONNECTION_LOST",
                        applied=None,
                    ), True
                writer.result()  # the stream is over (the reader says why), or the writer failed
        finally:
            for task in (reader, writer, stalled):
                task.cancel()
            call.cancel()

    async def _write(self, call: Any) -> None:
        try:  # nothing is written before the stream has reached a server
            await call.wait_for_connection()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # it never did: the reader reports why
        self._reached = True
        while True:
            while not self._waiting or len(self._sent) >= self._max_in_flight:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._without_settled(self._waiting.popleft())
            self._admit()
            if batch is None:  # every caller timed out or was cancelled
                continue
            batch.sent_at = self._loop.time()
            batch.attempts += 1
            if batch.deadlines:  # the server runs nothing after it (a paused node, woken up late)
                # The latest of its operations': one caller's early deadline fails no other's.
                left = max(batch.deadlines) - batch.sent_at
                batch.message.deadline_unix_ms = int((time.time() + left) * 1000)
            self._sent.append(batch)
            try:
                await call.write(batch.message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream is over; the reader reports why

    async def _read(self, call: Any) -> tuple[StoreError, bool]:
        """Hand out results until the stream ends; then why, and whether to retry.

        A stream the server ended cleanly is retried: the server answers every
        batch it read before it ends a stream, so the unanswered ones never ran.
        """
        while True:
            try:
                response = await call.read()
            except grpc.aio.AioRpcError as error:
                retry = error.code() in _RETRIED or (error.code(), error.details()) == _FAILED_IN_CORE
                failure = error_from_rpc(error)
                if not failure.reason:  # not the server's refusal: gRPC's own, the connection's
                    # Before it reached a server nothing was written to it: that much is certain.
                    reason, applied = ("CONNECTION_LOST", None) if self._reached else ("UNREACHABLE", False)
                    failure = type(failure)(str(failure), failure.code, reason=reason, applied=applied)
                return failure, retry
            if response is grpc.aio.EOF or response.ending:
                return _ENDED, True
            batch = next((sent for sent in self._sent if sent.message.id == response.id), None)
            if batch is None:
                unknown = f"INTERNAL: the server answered batch {response.id}, which is not awaiting answers"
                return StoreProtocolError(unknown, "INTERNAL"), False
            self._last_answer = self._loop.time()
            self._failures = 0
            self._broken_at = 0.0
            if (response.topology_version or response.members_down) and self._on_news is not None:
                self._on_news(response)
            futures = batch.futures
            index = batch.answered
            for result in response.results:
                future = futures[index]
                index += 1
                if future.done():
                    continue
                if self._raise_errors and result.WhichOneof("result") == "error" and result.error.deferred:
                    self._send_again(batch, index - 1)  # not run: the server answered enough for one batch
                    continue
                if batch.attempts > 1 and result.WhichOneof("result") == "error":
                    mark_outcome_unknown(result.error, EARLIER_ATTEMPT)  # that attempt may have run
                if self._raise_errors and result.WhichOneof("result") == "error":
                    future.set_exception(error_from_result(result.error))
                else:
                    future.set_result(result)
            batch.answered = index
            if index >= len(futures):
                self._sent.remove(batch)
                batch.stop_timer()
                self._wakeup.set()

    def _send_again(self, batch: _Batch, index: int) -> None:
        """Send the operation at `index` of `batch` again, in a batch of its own (what it reads may
        be as much as one batch is answered with; several go at once); its caller's future follows
        the new one."""
        operation = batch.message.operations[index]
        deadline = batch.deadlines[index] if batch.deadlines else None
        added, again = self.add(operation.ByteSize(), deadline, alone=True)
        added.CopyFrom(operation)
        caller = batch.futures[index]
        again.add_done_callback(functools.partial(_follow, caller, False))
        caller.add_done_callback(functools.partial(_cancel_if_cancelled, again))

    def _without_settled(self, batch: _Batch) -> _Batch | None:
        """`batch` with only the operations whose callers still wait (None: none do), unanswered.

        What is sent or sent again: an operation whose caller was told it timed out, or that
        was cancelled, must not be applied after that.
        """
        if batch.settled():
            batch.stop_timer()
            return None
        again = batch.unsettled()
        if again is not batch:
            batch.stop_timer()
            if again.deadlines:
                self._arm(again, min(again.deadlines))
        return again

    def _hand_over(self, reroute: Callable[[pb.Operation], Pipeline | None]) -> None:
        """Move the operations waiting here that `reroute` gives another pipeline to it; their
        callers' futures follow the new ones. (Sent here before, their outcome there is unknown
        if they fail: they may have been applied here.)"""
        kept: deque[_Batch] = deque()
        for batch in self._waiting:
            stays = _Batch(batch.message.id, batch.message.topology_version)
            stays.sent_at = batch.sent_at
            stays.attempts = batch.attempts
            for index, future in enumerate(batch.futures):
                if future.done():
                    continue
                operation = batch.message.operations[index]
                deadline = batch.deadlines[index] if batch.deadlines else None
                other = reroute(operation)
                if other is None or other is self:
                    stays.message.operations.append(operation)
                    stays.futures.append(future)
                    stays.payload += operation.ByteSize()
                    if deadline is not None:
                        stays.deadlines.append(deadline)
                    continue
                added, result = other.add(operation.ByteSize(), deadline)
                added.CopyFrom(operation)
                result.add_done_callback(functools.partial(_follow, future, bool(batch.sent_at)))
                future.add_done_callback(functools.partial(_cancel_if_cancelled, result))
            batch.stop_timer()
            if stays.futures:
                if stays.deadlines:
                    self._arm(stays, min(stays.deadlines))
                kept.append(stays)
        self._waiting = kept

    def _resend_unanswered(self, error: StoreError) -> None:
        while self._sent:
            batch = self._sent.pop()
            if error is _ENDED:  # never ran: this attempt does not count
                batch.attempts -= 1
                if not batch.attempts:
                    batch.sent_at = 0.0
            else:
                batch.fail_not_idempotent(error)
            again = self._without_settled(batch)
            if again is not None:
                self._waiting.appendleft(again)

    def _fail_sent(self, error: StoreError) -> None:
        while self._sent:
            self._sent.popleft().fail(error)

    def _fail_all(self, error: StoreError) -> None:
        self._fail_sent(error)
        while self._waiting:
            self._waiting.popleft().fail(error)
        self._admit()
