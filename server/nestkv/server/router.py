"""Where each operation of a batch runs: the contract of a router, and a single server's.

The batch runner (nestkv.server.batches) asks the router once per batch for a
`Route`, then asks the route about each operation: whether it runs elsewhere
(forwarded: its answer to come), and once it ran here, what else must answer
before its result stands (a delete_all on the other nodes, a read asked of a
key's previous owner). A single server runs everything here (`LocalRouter`);
a cluster node routes by its member list (nestkv.server.cluster.router).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from nestkv.server.security import Grant
from nestkv.v1 import store_pb2 as pb

Answer = Awaitable[pb.OperationResult | None]
"""An operation's result from elsewhere; None: the result as it is here stands."""


class Route(Protocol):
    """How the operations of one batch run: decided once per batch, asked once per operation."""

    def prepare(self, operations: Sequence[pb.Operation], start: int, stop: int) -> Awaitable[None] | None:
        """What to wait for before the slice `operations[start:stop]` runs here (None: nothing)."""

    def elsewhere(self, kind: str, request: Any, operation: pb.Operation) -> Answer | None:
        """The answer of the node that runs this operation instead of this one; None: it runs here.

        Raises a StoreFault for an operation that runs nowhere (KeyMoved: the sender sends it on).
        """

    def after(self, kind: str, request: Any, response: Any, operation: pb.Operation) -> Answer | None:
        """What else answers for an operation that ran here (`response`), if anything."""

    def finish(self, first: pb.PipelineResponse) -> None:
        """The batch ran: add to its first response what the caller should know (a newer list)."""


class Router(Protocol):
    """A node's routing: the Route of each batch, and the parts of calls other nodes add to."""

    forwards: bool
    """Whether operations may run on other nodes: an UNAVAILABLE may name another node then."""

    deadlines: bool
    """Whether a batch past its caller's deadline is refused (with replicas, where a node that
    wakes up late could overwrite a later write made around it); without replicas a late
    operation still runs in its turn."""

    def route(self, batch: pb.PipelineRequest, grant: Grant) -> Route:
        """The Route of `batch`, run as `grant` allows."""

    async def stats(self, request: pb.StatsRequest, response: pb.StatsResponse) -> None:
        """Add the other nodes' figures to this node's (`response`)."""

    def describe(self, response: pb.TopologyResponse) -> None:
        """Fill a Topology answer with the members (nothing for a single server)."""


class _Here:
    """Every operation of a batch runs here, and nothing else answers for it."""

    __slots__ = ()

    def prepare(self, operations: Sequence[pb.Operation], start: int, stop: int) -> Awaitable[None] | None:
        return None

    def elsewhere(self, kind: str, request: Any, operation: pb.Operation) -> Answer | None:
        return None

    def after(self, kind: str, request: Any, response: Any, operation: pb.Operation) -> Answer | None:
        return None

    def finish(self, first: pb.PipelineResponse) -> None:
        pass


_HERE = _Here()


class LocalRouter:
    """A single server's router: every key is here."""

    __slots__ = ()
    forwards = False
    deadlines = False

    def route(self, batch: pb.PipelineRequest, grant: Grant) -> Route:
        return _HERE

    async def stats(self, request: pb.StatsRequest, response: pb.StatsResponse) -> None:
        pass

    def describe(self, response: pb.TopologyResponse) -> None:
        pass  # no members: a client sends everything here
