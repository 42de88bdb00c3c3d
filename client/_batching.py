"""Coalescing: the operations that concurrent tasks issue travel together in Pipeline batches.

One `Pipeline` per channel and event loop keeps one Pipeline stream open.
An operation joins the batch being filled and the batch is written on the
next turn of the event loop, never on a timer: a lone operation waits for
nothing, and operations issued in the same moment share one message. A batch
closes at `max_batch_size` operations (or about `max_batch_bytes` of
payload); at most `max_batches_in_flight` batches await their results, and
when as many again are waiting to be sent, callers wait for room
(back-pressure).

Failures: an operation the server rejects fails alone, with the error of its
status. A stream that breaks with UNAVAILABLE or CANCELLED, or that the server
ends (it is shutting down), is opened again with backoff and the unanswered
batches are sent again (every operation is idempotent); after
`_MAX_ATTEMPTS` streams in a row fail so, every waiting operation fails with
StoreUnavailableError. Any other stream failure fails the batches that were
on it. Each batch has a deadline of `timeout` seconds from its first
operation; when it passes, the batch's callers get StoreTimeoutError. A
caller that is cancelled leaves the others untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from client.errors import (
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    error_from_code,
    error_from_rpc,
)
from nestkv.v1 import store_pb2 as pb

DEFAULT_MAX_BATCH_SIZE = 512
DEFAULT_MAX_BATCHES_IN_FLIGHT = 4
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024

_MAX_ATTEMPTS = 5
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# What grpc.aio reports when a write fails inside gRPC core, as when the
# server ends the stream while a batch is being written: nothing was delivered.
_FAILED_IN_CORE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


class _Batch:
    """Operations sent in one PipelineRequest, and the futures of their callers, in the same order."""

    __slots__ = ("answered", "futures", "message", "payload", "timer")

    def __init__(self, batch_id: int) -> None:
        self.message = pb.PipelineRequest(id=batch_id)
        self.futures: list[asyncio.Future[Any]] = []
        self.payload = 0
        self.answered = 0
        self.timer: asyncio.TimerHandle | None = None

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def fail(self, error: BaseException) -> None:
        self.stop_timer()
        for future in self.futures:
            if not future.done():
                future.set_exception(error)

    def settled(self) -> bool:
        return all(future.done() for future in self.futures)


class Pipeline:
    """Sends the operations issued in one event loop over one Pipeline stream, coalesced into batches."""

    __slots__ = (
        "_driver",
        "_failures",
        "_loop",
        "_max_batch_bytes",
        "_max_batch_size",
        "_max_in_flight",
        "_next_id",
        "_open_stream",
        "_room",
        "_sent",
        "_timeout",
        "_waiting",
        "_wakeup",
    )

    def __init__(
        self,
        open_stream: Callable[[], Any],
        *,
        timeout: float | None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        self._open_stream = open_stream
        self._timeout = timeout
        self._max_batch_size = max_batch_size
        self._max_in_flight = max_batches_in_flight
        self._max_batch_bytes = max_batch_bytes
        self._loop = asyncio.get_running_loop()
        self._waiting: deque[_Batch] = deque()  # not sent yet; the last one may still take operations
        self._sent: deque[_Batch] = deque()  # on the stream, oldest first, awaiting results
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._next_id = 0
        self._failures = 0  # streams in a row that broke before answering anything
        self._driver: asyncio.Task[None] | None = None

    def add(self, payload: int) -> tuple[pb.Operation, asyncio.Future[Any]]:
        """A new operation in the batch being filled, and the future of its OperationResult.

        The caller fills the operation in at once, before it awaits anything:
        the batch is sent on the next turn of the loop. `payload` is its size
        in bytes (key and value), for closing batches that grow too large.
        """
        batch = self._waiting[-1] if self._waiting else None
        if (
            batch is None
            or len(batch.futures) >= self._max_batch_size
            or (batch.payload + payload > self._max_batch_bytes and batch.futures)
            or (batch.timer is None and self._timeout is not None)  # its deadline passed: closed
        ):
            batch = self._new_batch()
        future = self._loop.create_future()
        batch.futures.append(future)
        batch.payload += payload
        self._wakeup.set()
        if self._driver is None:
            self._driver = self._loop.create_task(self._drive())
        return batch.message.operations.add(), future

    def has_room(self) -> bool:
        return len(self._waiting) <= self._max_in_flight

    async def wait_for_room(self) -> None:
        """Wait until the batches waiting to be sent are few enough to add more."""
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    async def close(self) -> None:
        """Stop the stream; operations still waiting fail with StoreUnavailableError."""
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        self._fail_all(StoreUnavailableError("CANCELLED: the store was closed", "CANCELLED"))

    def _new_batch(self) -> _Batch:
        self._next_id += 1
        batch = _Batch(self._next_id)
        if self._timeout is not None:
            batch.timer = self._loop.call_later(self._timeout, self._expire, batch)
        self._waiting.append(batch)
        return batch

    def _expire(self, batch: _Batch) -> None:
        batch.timer = None
        batch.fail(
            StoreTimeoutError(f"DEADLINE_EXCEEDED: no answer within {self._timeout} s", "DEADLINE_EXCEEDED")
        )

    async def _drive(self) -> None:
        """Keep a stream open while there is work, opening it again after failures."""
        self._failures = 0
        try:
            while self._waiting or self._sent:
                call = self._open_stream()
                writer = self._loop.create_task(self._write(call))
                try:
                    error, retry = await self._read(call)
                finally:
                    writer.cancel()
                    call.cancel()
                if not retry:
                    self._fail_sent(error or StoreError("the stream ended", "INTERNAL"))
                    continue
                self._failures += 1
                if self._failures >= _MAX_ATTEMPTS:
                    self._fail_all(error or StoreUnavailableError("UNAVAILABLE: the server ended the stream"))
                    continue
                self._resend_unanswered()
                await asyncio.sleep(min(_FIRST_BACKOFF * 2 ** (self._failures - 1), _MAX_BACKOFF))
        finally:
            self._driver = None

    async def _write(self, call: Any) -> None:
        while True:
            while not self._waiting or len(self._sent) >= self._max_in_flight:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._waiting.popleft()
            if len(self._waiting) <= self._max_in_flight:
                self._room.set()
            if batch.settled():  # every caller timed out or was cancelled
                batch.stop_timer()
                continue
            self._sent.append(batch)
            try:
                await call.write(batch.message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream is over; the reader reports why

    async def _read(self, call: Any) -> tuple[StoreError | None, bool]:
        """Hand out results until the stream ends; then why (None: it ended cleanly) and whether to retry.

        A stream the server ended cleanly is retried: the server answers every
        batch it read before it ends a stream, so the unanswered ones never ran.
        """
        while True:
            try:
                response = await call.read()
            except grpc.aio.AioRpcError as error:
                retry = error.code() in _RETRIED or (error.code(), error.details()) == _FAILED_IN_CORE
                return error_from_rpc(error), retry
            if response is grpc.aio.EOF:
                return None, True
            if not self._sent or response.id != self._sent[0].message.id:
                return StoreError(f"the server answered batch {response.id} out of order", "INTERNAL"), False
            self._failures = 0
            batch = self._sent[0]
            futures = batch.futures
            index = batch.answered
            for result in response.results:
                future = futures[index]
                index += 1
                if future.done():
                    continue
                if result.WhichOneof("result") == "error":
                    future.set_exception(error_from_code(result.error.code, result.error.message))
                else:
                    future.set_result(result)
            batch.answered = index
            if index >= len(futures):
                self._sent.popleft()
                batch.stop_timer()
                self._wakeup.set()

    def _resend_unanswered(self) -> None:
        while self._sent:
            batch = self._sent.pop()
            batch.answered = 0
            self._waiting.appendleft(batch)

    def _fail_sent(self, error: StoreError) -> None:
        while self._sent:
            self._sent.popleft().fail(error)

    def _fail_all(self, error: StoreError) -> None:
        self._fail_sent(error)
        while self._waiting:
            self._waiting.popleft().fail(error)
        self._room.set()
