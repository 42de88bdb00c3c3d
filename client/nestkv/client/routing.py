"""Routing: each operation straight to the node that owns its key, one Pipeline per node.

`Router` learns the cluster from the Topology RPC of the node the store was
given (the seed). Until it knows, and for a single server, everything goes
to the seed, which forwards what it does not own: nothing waits for the
topology, and nothing is ever sent to a node the topology does not name.
Each batch carries the topology version it was routed by; a node that holds
another version answers all the same and says so, and the router reads the
topology again. The owner of a key is computed by nestkv.wire.placement,
the same function the servers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from nestkv.v1 import store_pb2 as pb
from nestkv.wire.pipeline import Pipeline
from nestkv.wire.placement import HASH_NAME, Placement

log = logging.getLogger("nestkv.client")

News = Callable[[pb.PipelineResponse], None]
"""Told a node's answer that says the topology changed, or names members down (Router.news)."""

_RETRY_AFTER = 1.0  # seconds before a failed Topology read is tried again
_AVOID_FOR = 1.0  # seconds a node whose stream broke gets nothing another copy can take
_SILENT_FOR = 0.2  # seconds a stream is silent before it is given up, once another node says its node is down
_CONFIRMED_AFTER = 0.2
"""Seconds a member must have been named down before its silent stream is given up: the node
that named it may have heard first, and the key's next copy, where its operations go, sends them
to that member while it has not heard yet (to wait there for its peer timeout)."""
_SETTLED = float("inf")


class Router:
    """The pipelines of one event loop: the seed's, and one per member once the topology is known."""

    __slots__ = (
        "_closing",
        "_last_try",
        "_make_pipeline",
        "_named_down",
        "_placement",
        "_reading",
        "_replicas",
        "_root",
        "_seed",
        "_seed_stub",
        "_timeout",
        "_topology_of",
        "_watching",
        "members",
        "pipelines",
        "version",
    )

    def __init__(
        self,
        seed_stub: Any,
        open_seed: Callable[[News], Pipeline],
        make_pipeline: Callable[
            [str, News, Callable[[], str]], tuple[Pipeline, Callable[[], Any], Callable[..., Any]]
        ],
        timeout: float | None,
    ) -> None:
        """`open_seed(on_news)` makes the seed's Pipeline; `make_pipeline(address, on_news,
        topology_version)` opens a channel to a member: its Pipeline, how to close it, and its
        Topology RPC."""
        self._seed_stub = seed_stub
        self._make_pipeline = make_pipeline
        self._timeout = timeout
        self._placement: Placement | None = None
        self._root: tuple[str, ...] = ()
        self._replicas = 1
        self._reading: asyncio.Task[None] | None = None
        self._last_try = -_RETRY_AFTER
        self._closing: list[asyncio.Task[None]] = []
        self.version = ""
        self.members: dict[str, str] = {}
        self.pipelines: dict[str, tuple[Pipeline, Callable[[], Any]]] = {}
        self._topology_of: dict[str, Callable[..., Any]] = {}  # each member's Topology RPC
        self._named_down: dict[str, tuple[float, float]] = {}  # first and last time named down, lately
        self._watching: asyncio.Task[None] | None = None
        self._seed = open_seed(self.news)

    def pipeline_for(self, path: Sequence[str], key: str) -> Pipeline:
        """The pipeline of the node that owns `key` in `path` (the seed's while the owner is unknown);
        with replicas, of its first copy that can be reached."""
        placement = self._placement
        if placement is None:
            if self._last_try != _SETTLED:  # a single server answered: nothing to read
                self._read_soon()
            return self._seed
        full = (*self._root, *path) if self._root else path
        pipeline = self.pipelines[placement.owner(full, key)][0]
        if self._replicas == 1 or not pipeline.broke_lately(_AVOID_FOR):
            return pipeline
        # The first copy whose stream has not broken lately: any node sends an operation on to the
        # copy that serves it, so one that can be reached beats the owner that cannot.
        copies = placement.ranked(full, key)[: self._replicas]
        for member in copies:
            pipeline = self.pipelines[member][0]
            if not pipeline.broke_lately(_AVOID_FOR):
                return pipeline
        return self.pipelines[copies[0]][0]

    def _elsewhere(self, operation: pb.Operation) -> Pipeline | None:
        """Where an operation held by a member's broken stream goes instead: its key's next copy
        (None: nowhere, with one copy of each key, or for a delete_all, which every node runs)."""
        kind = operation.WhichOneof("operation")
        if self._replicas == 1 or kind is None or kind == "delete_all" or self._placement is None:
            return None
        request = getattr(operation, kind)
        return self.pipeline_for(request.path, request.key)

    def every_node(self) -> dict[str, Pipeline] | None:
        """Every member's pipeline, for an operation each must run (delete_all); None: not known."""
        if self._placement is None:
            self._read_soon()
            return None
        return {member: pipeline for member, (pipeline, _) in self.pipelines.items()}

    def news(self, response: pb.PipelineResponse) -> None:
        """A node answered with another topology version than the one the batch was routed by, or
        named members it knows not to answer for their keys: a stream to one of them that has gone
        silent is given up now (its operations go to their keys' next copies)."""
        if response.topology_version and response.topology_version != self.version:
            self._read_soon(force=True)
        if self._replicas > 1:
            self._down(response.members_down)

    def _down(self, members: Sequence[str]) -> None:
        """`members` were named down: give up a stream of theirs that has gone silent, once they
        have been named so for _CONFIRMED_AFTER."""
        now = time.monotonic()
        for member in members:
            first, last = self._named_down.get(member, (now, now))
            if now - last > 2 * _CONFIRMED_AFTER:
                first = now  # named again after a while: a new episode
            self._named_down[member] = first, now
            opened = self.pipelines.get(member)
            if opened is not None and now - first >= _CONFIRMED_AFTER:
                opened[0].give_up_if_silent(_SILENT_FOR)

    def _read_soon(self, *, force: bool = False) -> None:
        if self._reading is not None or (self._last_try == _SETTLED and not force):
            return
        now = time.monotonic()
        if not force and now - self._last_try < _RETRY_AFTER:
            return
        self._last_try = now
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            response = await self._seed_stub.Topology(pb.TopologyRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            # An older server (UNIMPLEMENTED) or one out of reach: the seed forwards meanwhile.
            log.debug("topology not read from the seed: %s", error.code().name)
            return
        finally:
            self._reading = None
        self._use(response)

    def _use(self, response: pb.TopologyResponse) -> None:
        members = {member.id: member.address for member in response.members}
        if not members or response.hash != HASH_NAME:
            self._placement = None  # a single server, or a hash this client does not know: the seed
            self._last_try = _SETTLED  # asked: only a node saying the version changed asks again
            return
        for member, (_, close) in list(self.pipelines.items()):
            if self.members.get(member) != members.get(member):
                del self.pipelines[member]
                self._topology_of.pop(member, None)
                # Its operations in flight get their deadline to finish before it closes.
                self._closing.append(
                    asyncio.get_running_loop().create_task(_close_later(close, self._timeout))
                )
        for member, address in members.items():
            if member not in self.pipelines:
                pipeline, close, topology = self._make_pipeline(address, self.news, self._version)
                self.pipelines[member] = pipeline, close
                self._topology_of[member] = topology
        self.members = members
        self.version = response.version
        self._root = tuple(response.root)
        self._replicas = max(response.replicas, 1)
        self._placement = Placement(members)
        for pipeline, _ in self.pipelines.values():  # one copy of each key: nowhere else to go
            pipeline.reroute = self._elsewhere if self._replicas > 1 else None
        if self._replicas > 1 and self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """With replicas, until closed: when a member's stream has held operations unanswered for
        _SILENT_FOR, ask another member's Topology whether it is down, and give the stream up if so
        (Router.news does the same with what answers carry; this finds out when every operation
        went to that member)."""
        while True:
            await asyncio.sleep(_SILENT_FOR / 2)
            pipelines = self.pipelines.items()
            silent = [member for member, (pipeline, _) in pipelines if pipeline.silent_for() >= _SILENT_FOR]
            others = [member for member in self._topology_of if member not in silent]
            if not silent or not others:
                continue
            try:
                response = await self._topology_of[random.choice(others)](
                    pb.TopologyRequest(), timeout=2 * _SILENT_FOR
                )
            except grpc.aio.AioRpcError:
                continue
            self._down(response.members_down)

    def _version(self) -> str:
        """What every member's batches carry: the version of the topology they were routed by."""
        return self.version

    @property
    def seed(self) -> Pipeline:
        return self._seed

    async def close(self) -> None:
        """Stop reading the topology and close every member's pipeline and channel."""
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        closers = [close for _, close in self.pipelines.values()]
        self.pipelines, self._placement = {}, None
        for close in closers:
            await close()
        for task in self._closing:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closing = []


async def _close_later(close: Callable[[], Any], delay: float | None) -> None:
    try:
        await asyncio.sleep(delay or 5.0)
    finally:
        await close()
