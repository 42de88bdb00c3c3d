"""Connections to the other members: one channel and one Pipeline stream per peer, for forwarding.

Every call is one of PeerService (peer.proto). Forwarded operations ride the Pipeline stream
driver GrpcStore uses too (nestkv.wire.pipeline):
those forwarded in the same turn of the loop share a batch, batches keep their
order per peer, a broken stream is opened again and its unanswered operations
sent again. Every call carries `nestkv-peer: <this node's id>`; the receiving
node runs what it is sent on its own store and never forwards it again.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from nestkv.server.errors import NodeFault, StoreFault, Unreachable
from nestkv.v1 import peer_pb2 as peer_pb
from nestkv.v1 import peer_pb2_grpc
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.channel import channel_options
from nestkv.wire.errors import StoreError, StoreTimeoutError, error_from_rpc
from nestkv.wire.pipeline import Pipeline

PEER_HEADER = "nestkv-peer"
"""Metadata naming the node that sent a call: its operations were routed (and scoped) there."""

MODE_HEADER = "nestkv-peer-mode"
"""Metadata of a peer stream saying why its operations came here (absent: sent to their owner):

- `redirected`: another node said this one owns the keys (ABORTED with moved_to): run them here;
- `asked`: the new owner of the keys asks this node, their previous owner, during a hand-off:
  answer from what this node holds, and nothing more;
- `replica`: copies of changes made on the sending node, for this one to merge (--replicas 2 or
  more), on a stream of their own with a shorter timeout: a copy that does not answer in time is
  replaced by a stand-in.
"""

MODES = ("", "redirected", "asked", "replica")

PEER_TIMEOUT = 3.0
"""Seconds a forwarded operation may take: under GrpcStore's 5 s, so its caller hears why."""

REPLICA_TIMEOUT = 1.0
"""Seconds a copy may take to store a replica before a stand-in is sent it instead."""

HAND_OFF_TIMEOUT = 600.0
"""Seconds one hand-off stream may take: a node's worth of keys to one member."""


class PeerUnavailable(Exception):
    """A peer did not answer; the message names it."""


class Peers:
    """This node's connections to the other members, opened on first use and kept."""

    def __init__(
        self,
        node_id: str,
        credentials: grpc.ChannelCredentials | None,
        max_value_bytes: int,
        topology_version: Callable[[], str],
        timeout: float = PEER_TIMEOUT,
    ) -> None:
        """`topology_version()` is the version of this node's member list, sent with every batch
        forwarded: the list its operations were placed by, for the receiver to compare."""
        self._topology_version = topology_version
        self._metadata = ((PEER_HEADER, node_id),)
        self._node_id = node_id
        self._credentials = credentials
        self._options = [
            # A peer that was down (starting, restarting) is reconnected to within a fifth of a
            # second, not after gRPC's default backoff of 1 s growing to 2 minutes: forwarded
            # operations fail fast while it is down, and go through as soon as it is back. Every
            # member must reach it again within well under a LEASE of each other: one that reaches
            # it while another does not grants it a lease the other cannot see refused, and the
            # other refuses its keys' operations meanwhile (Replication.serving_copy). With a
            # backoff growing to 1 s, a rolling restart failed such operations for up to 0.7 s.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 200),
            *channel_options(max_value_bytes),
        ]
        self._timeout = timeout
        self._open: dict[str, tuple[Any, Any, dict[str, Pipeline]]] = {}

    def _connection(self, address: str) -> tuple[Any, Any, dict[str, Pipeline]]:
        """The channel and stub to `address`, and its Pipeline for each mode (see MODE_HEADER)."""
        opened = self._open.get(address)
        if opened is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            stub = peer_pb2_grpc.PeerServiceStub(channel)

            pipelines = {}
            for mode in MODES:
                metadata = (*self._metadata, (MODE_HEADER, mode)) if mode else self._metadata
                pipelines[mode] = Pipeline(
                    functools.partial(stub.Pipeline, metadata=metadata),
                    timeout=min(self._timeout, REPLICA_TIMEOUT) if mode == "replica" else self._timeout,
                    topology_version=self._topology_version,
                    raise_errors=False,  # a peer's error goes back to the caller as it came
                )
            opened = self._open[address] = (channel, stub, pipelines)
        return opened

    def forward(
        self, address: str, operation: pb.Operation, mode: str = "", deadline: float = 0.0
    ) -> asyncio.Future[Any]:
        """Send `operation` to the peer at `address`; the future of its OperationResult.

        An operation's error is its result (with `moved_to`, the caller redirects it); the future
        fails with a StoreError when the peer could not be reached or did not answer in time: the
        peer timeout, or its caller's `deadline` (Unix seconds; 0: none) if that comes first.
        """
        pipeline = self._connection(address)[2][mode]
        at = pipeline.deadline()
        if deadline and at is not None:
            at = min(at, asyncio.get_running_loop().time() + deadline - time.time())
        added, future = pipeline.add(operation.ByteSize(), at)
        added.CopyFrom(operation)
        return future

    async def stats(self, address: str, request: pb.StatsRequest) -> pb.StatsResponse:
        """The peer's own figures for the (already scoped) path of `request`."""
        stub = self._connection(address)[1]
        try:
            response: pb.StatsResponse = await stub.Stats(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise PeerUnavailable(f"{address}: {error_from_rpc(error)}") from None
        return response

    async def ping(self, address: str, seconds: float) -> peer_pb.PingResponse:
        """The peer's answer to a ping (see nestkv.server.cluster.liveness)."""
        stub = self._connection(address)[1]
        response: peer_pb.PingResponse = await stub.Ping(
            peer_pb.PingRequest(), metadata=self._metadata, timeout=seconds
        )
        return response

    def catch_up(self, address: str, topology_version: str) -> Any:
        """The peer's CatchUp stream: what it holds of this node's keys."""
        stub = self._connection(address)[1]
        request = peer_pb.CatchUpRequest(topology_version=topology_version)
        return stub.CatchUp(request, metadata=self._metadata, timeout=HAND_OFF_TIMEOUT)

    async def topology(self, address: str) -> pb.TopologyResponse:
        """The peer's member list, and the one it had before."""
        stub = self._connection(address)[1]
        response: pb.TopologyResponse = await stub.Topology(
            pb.TopologyRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return response

    def hand_off(self, address: str) -> Callable[[Any], Awaitable[peer_pb.HandOffResponse]]:
        """The HandOff call to the peer at `address`: give it the requests, await its answer."""
        stub = self._connection(address)[1]
        return functools.partial(stub.HandOff, metadata=self._metadata, timeout=HAND_OFF_TIMEOUT)

    async def close(self) -> None:
        opened, self._open = self._open, {}
        for channel, _, pipelines in opened.values():
            for pipeline in pipelines.values():
                await pipeline.close()
            await channel.close()


def failure_of(member: str, error: BaseException, timeout: float = PEER_TIMEOUT) -> StoreFault:
    """The fault of a forwarded operation whose peer stream failed, naming the node.

    A node that did not answer in time is Unreachable, as one that could not be reached: the
    caller's key is on that node. Whether the operation was applied is what the stream's
    failure says. (An operation's own error comes back as its result.)
    """
    if isinstance(error, StoreTimeoutError):
        why = f"node {member} did not answer within {timeout} s"
        return Unreachable(why, applied=error.applied, node=member)
    if isinstance(error, StoreError):
        if error.code in ("UNAVAILABLE", "CANCELLED"):
            return Unreachable(f"node {member} is unavailable: {error}", applied=error.applied, node=member)
        if error.code == "UNAUTHENTICATED":  # it has not read the member list naming this node yet
            why = f"node {member} does not take this node as a member (yet): {error}"
            return Unreachable(why, applied=False, node=member)
        message = str(error).removeprefix(f"{error.code}: ")
        return NodeFault(error.code, error.reason or "INTERNAL", message, applied=error.applied, node=member)
    return StoreFault(f"forwarding to node {member} failed: {error!r}", node=member)
