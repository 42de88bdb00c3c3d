"""Running a batch: every call's operations, a Pipeline batch or a one-operation RPC (a batch of one).

`BatchRunner.run` is the one path of an operation on a node: scoped by the
caller's grant, placed by the router (here, or another node's answer to
come), run on the storage (nestkv.server.operations), counted, committed.
A fault becomes the operation's error result; only a failed commit fails
the whole batch (the caller may send it again: every operation is idempotent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from nestkv.server.errors import (
    DeadlineExceeded,
    Deferred,
    InvalidArgument,
    KeyMoved,
    StoreFault,
    status_of,
)
from nestkv.server.limits import MiB
from nestkv.server.metrics import OperationMetrics
from nestkv.server.operations import KINDS, Operations, unlogged
from nestkv.server.router import Answer, Route, Router
from nestkv.server.security import Grant
from nestkv.server.status import put_error
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.codes import name_of

RESPONSE_CHUNK_BYTES = 1 * MiB
"""Values a PipelineResponse carries before the rest of its batch goes in the next one."""

ANSWER_BYTES = 1 * MiB
"""Values a batch's gets may read before its later gets are deferred, not run (see
PipelineRequest.operations): what a node holds for one batch's answer is this and one value, at
most, whatever the batch asks for and whether its caller reads."""

# Operations run between two yields to the event loop: a large batch runs in slices, so that no
# other caller waits behind it for more than one slice (a few milliseconds). In a cluster, a
# slice's forwarded operations are answered before the next slice runs: what one batch has sent
# to other nodes and not had answered is at most a slice.
SLICE_OPERATIONS = 256

_EMPTY = f"operation is empty; set one of {', '.join(KINDS)}"

Pending = list[tuple[pb.OperationResult, Answer, pb.Operation | None]]
"""Results whose answer comes from elsewhere, with that answer, and the operation if it runs
there (None: it ran here, and something else adds to its answer)."""


class Reads:
    """The bytes of values a batch's gets have read so far, against ANSWER_BYTES."""

    __slots__ = ("bytes", "limit")

    def __init__(self, limit: int = ANSWER_BYTES) -> None:
        self.bytes = 0
        self.limit = limit

    def over(self) -> bool:
        """Whether the batch's later gets are deferred."""
        return self.bytes >= self.limit


_DEFERRED = Deferred(
    f"not run: the gets before it in its batch read {ANSWER_BYTES} B of values or more, the most one "
    "batch is answered with; send it again in another batch (GrpcStore does)"
)

SliceAnswer = list[pb.PipelineResponse] | Coroutine[Any, Any, list[pb.PipelineResponse]]
"""The responses of a slice: a list when it was answered here, else a coroutine to await (it
waits on other nodes; no task of its own: a loop turn less per batch)."""


async def responses_of(answer: SliceAnswer) -> list[pb.PipelineResponse]:
    """The responses of a slice's answer, once they are all in."""
    return answer if isinstance(answer, list) else await answer


class BatchRunner:
    """Runs batches on one node: through its router, on its operations, counted and committed."""

    def __init__(
        self,
        operations: Operations,
        router: Router,
        *,
        commit: Callable[[], None] | None = None,
        metrics: OperationMetrics | None = None,
        chunk_bytes: int = RESPONSE_CHUNK_BYTES,
        answer_bytes: int = ANSWER_BYTES,
    ) -> None:
        """`commit` runs after each slice's writes, before the answer; `metrics`, if given, counts
        every operation run here with its status and duration; `answer_bytes`: see ANSWER_BYTES."""
        self._operations = operations.by_kind
        self._router = router
        self._commit = commit or unlogged
        self._metrics = metrics
        self._chunk_bytes = chunk_bytes
        self._answer_bytes = answer_bytes
        self._abandoned: set[asyncio.Future[Any]] = set()  # answers of a slice whose commit failed

    async def run(
        self, batch: pb.PipelineRequest, grant: Grant, answer: Callable[[SliceAnswer], Awaitable[None]]
    ) -> None:
        """Run `batch` as `grant` allows, a slice at a time, and `answer` each slice's responses,
        in order (a slice's operations sent elsewhere are answered before the next slice runs;
        the last slice's answers come when they come, while the caller reads on).

        Run here, a slice's operations get one response unless the values read need more. A
        failed commit raises its StoreFault (the slices before it were handed to `answer`).
        """
        route = self._router.route(batch, grant)
        starts = _slice_starts(batch)
        last = starts[-1]
        reads = Reads(self._answer_bytes)
        for start in starts:
            pending: Pending = []
            ready = route.prepare(batch.operations, start, start + SLICE_OPERATIONS)
            if ready is not None:  # copies to take in first (a resize): this stream waits for them
                await ready
            responses = self._run_slice(batch, grant, route, pending, start, reads)
            if not start:
                route.finish(responses[0])
            if start == last:
                if not pending:
                    await answer(responses)
                    return
                waiting = self._gather(batch.id, responses, pending, route, reads)
                try:
                    await answer(waiting)
                except BaseException:  # cancelled before the caller took it: it comes to nobody
                    self.abandon(waiting)
                    raise
                return
            if pending:
                await _answered(pending, route, reads)
                responses = _rechunk(batch.id, responses, self._chunk_bytes)
            await answer(responses)
            await asyncio.sleep(0)  # a slice done: let other callers run

    async def run_all(
        self, batch: pb.PipelineRequest, grant: Grant
    ) -> tuple[list[pb.PipelineResponse], bool]:
        """`run`, its answers awaited: every response of `batch`, and whether its last slice
        waited for answers from other nodes."""
        answers: list[SliceAnswer] = []

        async def keep(answer: SliceAnswer) -> None:
            answers.append(answer)

        await self.run(batch, grant, keep)
        responses: list[pb.PipelineResponse] = []
        for answer in answers:
            responses += await responses_of(answer)
        return responses, not isinstance(answers[-1], list)

    async def _gather(
        self,
        batch_id: int,
        responses: list[pb.PipelineResponse],
        pending: Pending,
        route: Route,
        reads: Reads,
    ) -> list[pb.PipelineResponse]:
        await _answered(pending, route, reads)
        return _rechunk(batch_id, responses, self._chunk_bytes)

    def _run_slice(
        self,
        batch: pb.PipelineRequest,
        grant: Grant,
        route: Route,
        pending: Pending,
        start: int,
        reads: Reads,
    ) -> list[pb.PipelineResponse]:
        """Run the slice of `batch` that begins at `start`; one response unless the values read
        need more. Answers to come from elsewhere go in `pending`; a get after the batch's `reads`
        reached their limit is deferred."""
        if batch.deadline_unix_ms and self._router.deadlines and time.time() * 1000 >= batch.deadline_unix_ms:
            return self._too_late(batch, start)
        scope = grant.scope
        # A peer passes the message to its caller, who may be confined to a namespace.
        confined = bool(grant.root) or grant.forwarded
        response = pb.PipelineResponse(id=batch.id)
        responses = [response]
        results = response.results
        room = self._chunk_bytes
        stop = start + SLICE_OPERATIONS
        operations = self._operations
        metrics = self._metrics
        clock = time.perf_counter
        started = clock() if metrics else 0.0
        whole = start == 0 and stop >= len(batch.operations)
        forwarded: list[int] = []  # where in the slice the operations that run elsewhere are
        for position, operation in enumerate(batch.operations if whole else batch.operations[start:stop]):
            result = results.add()
            kind = operation.WhichOneof("operation")
            if kind is None:
                put_error(result.error, InvalidArgument(_EMPTY, "operation"), confined=False)
                continue
            out = getattr(result, kind)
            out.SetInParent()
            try:
                request = getattr(operation, kind)
                scope(kind, request)
                if kind == "get" and reads.over():
                    _defer(result)
                    continue
                answer = route.elsewhere(kind, request, operation)
                if answer is not None:  # counted by the node that runs it
                    forwarded.append(position)
                    pending.append((result, answer, operation))
                    if metrics:
                        started = clock()
                    continue
                operations[kind](request, out)
            except StoreFault as fault:
                put_error(result.error, fault, confined=confined)
                if isinstance(fault, KeyMoved):  # it runs elsewhere, and is counted there
                    forwarded.append(position)
                elif metrics:
                    now = clock()
                    metrics.record(kind, status_of(fault), now - started)
                    started = now
                continue
            if metrics:
                # From the end of the operation before: its parsing and its result's building count too.
                now = clock()
                metrics.succeeded(kind, now - started)
                started = now
            if kind == "get":
                reads.bytes += len(out.value)
                room -= len(out.value)
                if room < 0 and len(results) > 1:
                    # Too much for one message: this result opens the next response.
                    response = pb.PipelineResponse(id=batch.id)
                    responses.append(response)
                    result = response.results.add()
                    result.CopyFrom(results[-1])
                    del results[-1]
                    results = response.results
                    out = result.get
                    room = self._chunk_bytes - len(out.value)
            answer = route.after(kind, request, out, operation)  # once the result is where it stays
            if answer is not None:
                pending.append((result, answer, None))
        try:
            self._commit()
        except StoreFault as fault:
            if metrics:  # the call fails: every operation of the slice run here failed with it
                _recount(metrics, batch.operations[start:stop], responses, forwarded, status_of(fault))
            for _, answer, _ in pending:  # sent already: let the answers come, to nobody
                self.abandon(answer)
            raise
        return responses

    def _too_late(self, batch: pb.PipelineRequest, start: int) -> list[pb.PipelineResponse]:
        """The responses of a slice whose caller's deadline passed before it ran: none of its
        operations is applied (its caller was told, or will be, that they failed)."""
        response = pb.PipelineResponse(id=batch.id)
        operations = batch.operations[start : start + SLICE_OPERATIONS]
        fault = DeadlineExceeded(
            "the caller's deadline passed before this node ran the operation: not applied"
        )
        for operation in operations:
            put_error(response.results.add().error, fault, confined=False)
            kind = operation.WhichOneof("operation")
            if self._metrics and kind is not None:
                self._metrics.record(kind, status_of(fault), 0.0)
        return [response]

    def abandon(self, answer: Awaitable[Any]) -> None:
        """Let an answer that nobody will read come all the same (the stream or the call is over):
        what it waits on ends, and its failure is taken, not left to be logged as never retrieved."""
        left = asyncio.ensure_future(answer)
        self._abandoned.add(left)
        left.add_done_callback(self._abandoned.discard)


def _slice_starts(batch: pb.PipelineRequest) -> range:
    """Where each slice of a batch starts (one slice for an empty batch, which is answered too)."""
    return range(0, max(len(batch.operations), 1), SLICE_OPERATIONS)


async def _answered(pending: Pending, route: Route, reads: Reads) -> None:
    """Wait for the answers from elsewhere and put each in its result (an error result stays).

    A get the node that runs it deferred (the values of the batch it was in there, which may
    hold other callers' operations too, reached their limit) is sent there again while this
    batch's own `reads` are under theirs, and deferred to the caller once they are not: what
    this node holds for the batch stays within its limit and one round of answers.
    """
    while pending:
        answers = await asyncio.gather(*(answer for _, answer, _ in pending))
        again: Pending = []
        for (result, _, operation), answer in zip(pending, answers, strict=True):
            if answer is None or result.WhichOneof("result") == "error":
                continue
            if answer.WhichOneof("result") == "error" and answer.error.deferred and operation is not None:
                try:
                    resent = None if reads.over() else route.elsewhere("get", operation.get, operation)
                except StoreFault as fault:
                    put_error(result.error, fault, confined=False)  # a peer's fault, passed on as it came
                    continue
                if resent is None:  # over the limit (or the key is here now): the caller sends it again
                    _defer(result)
                else:
                    again.append((result, resent, operation))
                continue
            result.CopyFrom(answer)
            if answer.WhichOneof("result") == "get":
                reads.bytes += len(answer.get.value)
        pending = again


def _defer(result: pb.OperationResult) -> None:
    """Answer a get with `_DEFERRED`: not run, to be sent again."""
    put_error(result.error, _DEFERRED, confined=False)


def _recount(
    metrics: OperationMetrics,
    operations: Sequence[pb.Operation],
    responses: list[pb.PipelineResponse],
    forwarded: list[int],
    code: str,
) -> None:
    """Count every operation of a slice whose commit failed with `code` instead of its own status
    (not those sent elsewhere, which were not counted here)."""
    results = [result for response in responses for result in response.results]
    elsewhere = set(forwarded)
    for position, (operation, result) in enumerate(zip(operations, results, strict=True)):
        kind = operation.WhichOneof("operation")
        if kind is not None and position not in elsewhere:
            error = result.WhichOneof("result") == "error"
            metrics.recount(kind, name_of(result.error.code) if error else "OK", code)


def _rechunk(
    batch_id: int, responses: list[pb.PipelineResponse], chunk_bytes: int
) -> list[pb.PipelineResponse]:
    """`responses` cut again so that values of about `chunk_bytes` go in each (forwarded reads
    arrive after the batch was first cut)."""
    results = [result for response in responses for result in response.results]
    if len(responses) == 1 and sum(len(result.get.value) for result in results) <= chunk_bytes:
        return responses
    cut = [pb.PipelineResponse(id=batch_id, topology_version=responses[0].topology_version)]
    room = chunk_bytes
    for result in results:
        size = len(result.get.value)
        if size > room and cut[-1].results:
            cut.append(pb.PipelineResponse(id=batch_id))
            room = chunk_bytes
        room -= size
        cut[-1].results.add().CopyFrom(result)
    return cut
