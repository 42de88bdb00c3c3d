"""A cluster node's router: each operation to the node that owns its key, and what a change of members needs.

For a batch from a client, an operation on a key another member owns is
forwarded there (a peer Pipeline stream, nestkv.server.cluster.peers), and a
delete_all runs here and on every other member, unless the client sent it to
each itself (it routed the batch by this node's list). For a batch a peer
forwarded, everything runs here, except a key this node's list gives to yet
another node: that answers KeyMoved, and the peer sends it on once.

While hand-offs run (nestkv.server.cluster.handoff), a read that misses is
asked of the key's previous owner: its copy is merged here by version, and
the read runs here again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from nestkv.server.cluster.admission import PeerGrant
from nestkv.server.cluster.node import Cluster
from nestkv.server.cluster.peers import failure_of
from nestkv.server.cluster.replication import NOT_APPLIED, Replication
from nestkv.server.errors import KeyMoved, MembersChanging, NotServing, StoreFault, Unreachable
from nestkv.server.metrics import OperationMetrics
from nestkv.server.operations import READS, Operations, changed, found
from nestkv.server.router import Answer, Route
from nestkv.server.security import Grant
from nestkv.server.status import put_error
from nestkv.v1 import store_pb2 as pb
from nestkv.wire.operations import conditional


class ClusterRouter:
    """Routes the batches of one cluster node (see the module's docstring)."""

    forwards = True

    def __init__(
        self, cluster: Cluster, operations: Operations, metrics: OperationMetrics | None = None
    ) -> None:
        """`operations` runs a read again here (after a previous owner's miss); `metrics`, if given,
        counts the operations forwarded to each node."""
        self.cluster = cluster
        self.deadlines = cluster.replication is not None
        self._operations = operations
        self._metrics = metrics

    def route(self, batch: pb.PipelineRequest, grant: Grant) -> Route:
        if batch.topology_version:
            self.cluster.heard_of(
                batch.topology_version, grant.sender if isinstance(grant, PeerGrant) else ""
            )
        return _ClusterRoute(self, batch, grant)

    def forward(self, member: str, operation: pb.Operation, deadline: float = 0.0) -> Answer:
        """Run `operation` on `member`, the owner of its key or its serving copy (counted as
        forwarded), by the caller's `deadline` (Unix seconds; 0: none)."""
        self._count(member)
        return self._send(member, operation, deadline=deadline)

    def fan_out(self, operation: pb.Operation) -> Answer:
        """Run `operation` (a delete_all) on every other member: None if all did, else an error
        result naming those that did not."""
        cluster = self.cluster
        members = cluster.others()
        for member in members:
            self._count(member)
        futures = {member: cluster.peers.forward(address, operation) for member, address in members.items()}
        return _all_of(futures)

    async def ask(
        self, member: str, path: Any, key: str, operation: pb.Operation
    ) -> pb.OperationResult | None:
        """A read that missed here, run again once the copy of the key's previous owner `member` is
        merged here (by version: a delete here since stays a delete); None: the miss stands."""
        handoff = self.cluster.handoff
        assert handoff.previous is not None  # a previous owner is named only while there is a list before
        fetch = pb.Operation(get=pb.GetRequest(path=path, key=key, with_version=True))
        result = await self._send(member, fetch, handoff.previous.members[member], "asked")
        if result.WhichOneof("result") == "error":
            return None if handoff.unanswered(member) else result
        if result.get.found and not result.get.version:
            # A node older than versions (a rolling upgrade): nothing to merge by; its answer stands.
            return await self._send(member, operation, handoff.previous.members[member], "asked")
        handoff.merge_asked(path, key, result.get)
        # A miss there may be news too: a hand-off stores a key here before the previous owner
        # drops it, so a miss there that came after the drop finds it here now.
        return self._operations.result_of(operation)

    async def take_previous(
        self, wanted: dict[tuple[tuple[str, ...], str], str]
    ) -> set[tuple[tuple[str, ...], str]]:
        """Merge here the copies the keys' previous owners hold ((path, key) -> member), before
        operations on the keys' state run here; the keys whose previous owner did not answer."""
        handoff = self.cluster.handoff
        previous = handoff.previous
        assert previous is not None  # a previous owner is named only while there is a list before
        keys = list(wanted)
        results = await asyncio.gather(
            *(
                self._send(
                    wanted[path, key],
                    pb.Operation(get=pb.GetRequest(path=path, key=key, with_version=True)),
                    previous.members[wanted[path, key]],
                    "asked",
                )
                for path, key in keys
            )
        )
        unanswered = set()
        for (path, key), result in zip(keys, results, strict=True):
            if result.WhichOneof("result") != "error":
                handoff.merge_asked(path, key, result.get)
            elif not handoff.unanswered(wanted[path, key]):
                unanswered.add((path, key))
        return unanswered

    def holds(self, path: Any, key: str) -> bool:
        """Whether this node holds a live value of the key."""
        return self._operations.holds(path, key)

    def _count(self, member: str) -> None:
        metrics = self._metrics
        if metrics:
            metrics.forwarded[member] = metrics.forwarded.get(member, 0) + 1

    def _send(
        self, member: str, operation: pb.Operation, address: str = "", mode: str = "", deadline: float = 0.0
    ) -> Awaitable[pb.OperationResult]:
        """Run `operation` on `member` (at `address`, default: its address in the current list); its
        OperationResult, an error result if it failed. Sent on once if the member's list gives the
        key to another node. `mode`: see PeerGrant; `deadline`: see `forward`."""
        address = address or self.cluster.topology.members[member]
        future = self.cluster.peers.forward(address, operation, mode, deadline)
        return self._result_of(member, address, operation, future, deadline)

    async def _result_of(
        self,
        member: str,
        address: str,
        operation: pb.Operation,
        future: asyncio.Future[Any],
        deadline: float = 0.0,
    ) -> pb.OperationResult:
        """The result of a forwarded operation, following a redirect once.

        A node that redirects still holds the keys it has not handed off yet: a read that misses
        where it was redirected to is asked of it once more; and if it misses there too, of the
        node it was redirected to once more (a hand-off stores a key on its new owner before the
        previous owner drops it: two misses in that order may have come either side of both).
        """
        peers = self.cluster.peers
        try:
            result: pb.OperationResult = await future
            if _moved(result):
                moved_from = address
                member, address = result.error.moved_to.id, result.error.moved_to.address
                result = await peers.forward(address, operation, "redirected", deadline)
                if _missed(operation, result):
                    member, owner = f"{member}'s previous owner", member
                    result = await peers.forward(moved_from, operation, "asked", deadline)
                    if _missed(operation, result):
                        member = owner
                        result = await peers.forward(address, operation, "redirected", deadline)
                if _moved(result):  # sent on once only: the lists are changing, try again
                    disagree = f"the member lists of the nodes disagree: {result.error.message}"
                    return _error_result(MembersChanging(disagree))
        except Exception as error:
            return _error_result(failure_of(member, error))
        return result

    async def stats(self, request: pb.StatsRequest, response: pb.StatsResponse) -> None:
        """Every other member's own figures for the scoped path added to this node's: each, and summed."""
        cluster = self.cluster
        own = pb.NodeStats(node_id=cluster.node_id, namespace=response.namespace, server=response.server)
        if response.HasField("quota"):
            own.quota.CopyFrom(response.quota)
        others = list(cluster.others().items())
        answers = await asyncio.gather(
            *(cluster.peers.stats(address, request) for _, address in others), return_exceptions=True
        )
        missing = {
            member: f"{member}: {answer}"
            for (member, _), answer in zip(others, answers, strict=True)
            if isinstance(answer, BaseException)
        }
        if missing:
            raise Unreachable(
                f"stats did not reach {len(missing)} of {len(answers) + 1} nodes: "
                + "; ".join(missing.values()),
                applied=False,  # a read
                node=next(iter(missing)),
            )
        response.nodes.append(own)
        for (member, _), answer in sorted(zip(others, answers, strict=True), key=lambda pair: pair[0][0]):
            assert isinstance(answer, pb.StatsResponse)
            node = response.nodes.add(node_id=member, namespace=answer.namespace, server=answer.server)
            if answer.HasField("quota"):
                node.quota.CopyFrom(answer.quota)
                if not response.HasField("quota"):
                    response.quota.CopyFrom(answer.quota)
                response.quota.used_bytes = max(response.quota.used_bytes, answer.quota.used_bytes)
        total_namespace, total_server = response.namespace, response.server
        for node in response.nodes[1:]:
            for name in ("keys", "bytes", "expiring_keys"):
                setattr(total_namespace, name, getattr(total_namespace, name) + getattr(node.namespace, name))
            total_namespace.child_namespaces = max(
                total_namespace.child_namespaces, node.namespace.child_namespaces
            )
            for name in _SUMMED:
                setattr(total_server, name, getattr(total_server, name) + getattr(node.server, name))

    def describe(self, response: pb.TopologyResponse) -> None:
        """The members, the version of their list, this node's id, and the version before."""
        cluster = self.cluster
        topology = cluster.topology
        for member, address in topology.members.items():
            response.members.add(id=member, address=address)
        response.version = topology.version
        response.node_id = cluster.node_id
        response.replicas = topology.replicas
        if cluster.replication is not None:
            response.members_down.extend(cluster.replication.liveness.down)
        previous = cluster.handoff.previous
        if previous is not None:
            response.previous_version = previous.version


class _ClusterRoute:
    """How one batch's operations run on a cluster node: decided once per batch (the clock and
    the member list are read once), asked once per operation."""

    __slots__ = (
        "_asks",
        "_deadline",
        "_fan_out",
        "_forward",
        "_grant",
        "_moving",
        "_replicas",
        "_resizing",
        "_router",
        "_unfetched",
        "_version",
    )

    def __init__(self, router: ClusterRouter, batch: pb.PipelineRequest, grant: Grant) -> None:
        cluster = router.cluster
        self._router = router
        self._grant = grant
        self._version = batch.topology_version
        self._forward = not grant.forwarded  # a caller's batch: keys go to their owners
        # A batch the client routed by the current list: its delete_all is for this node only.
        self._fan_out = self._forward and batch.topology_version != cluster.topology.version
        # A peer's operations on keys our list gives to another node go back to it, to send there;
        # even redirected ones, once this node is off its own list (it is handing everything off).
        peer_mode = grant.mode if isinstance(grant, PeerGrant) else None
        self._moving = peer_mode == "" or (peer_mode == "redirected" and cluster.removed)
        # Redirected (the sender asks next) or asked: a miss is answered from what is here.
        self._asks = not peer_mode
        self._deadline = batch.deadline_unix_ms / 1000
        self._replicas = cluster.replication  # None: one copy of each key, on its owner
        handoff = cluster.handoff
        self._resizing = (
            self._replicas is None
            and (self._asks or peer_mode == "redirected")
            and handoff.previous is not None
            and handoff.open
        )
        self._unfetched: set[tuple[tuple[str, ...], str]] = set()  # see `prepare`

    def elsewhere(self, kind: str, request: Any, operation: pb.Operation) -> Answer | None:
        if kind == "delete_all" or kind == "replica":
            return None  # here first; the other nodes after (see `after`); a replica: here only
        if self._replicas is not None:
            return self._placed(self._replicas, kind, request, operation)
        if self._forward:
            owner = self._router.cluster.owner(request.path, request.key)
            if owner is not None:
                return self._router.forward(owner, operation)
        elif self._moving:
            # Even back to the sender: its list gives the key to this node, ours to it, and a key
            # handed off there is found only there.
            cluster = self._router.cluster
            owner = cluster.owner(request.path, request.key)
            if owner is not None:
                raise KeyMoved(owner, cluster.topology.members[owner])
        unfetched = self._unfetched and (tuple(request.path), request.key) in self._unfetched
        if unfetched and conditional(kind, request):
            previous = "the key's previous owner did not answer while hand-offs run"
            raise NotServing(f"{previous}: {NOT_APPLIED}")
        return None

    def prepare(self, operations: Sequence[pb.Operation], start: int, stop: int) -> Awaitable[None] | None:
        """While hand-offs run (no replicas), a key this node owns may still be on its previous
        owner only: for the operations on a key's state (an increment, a conditional write) on
        keys not held here, that copy is merged here before the slice runs, so that they act on
        it, in the slice's order.

        With replicas, while this node steps up (caught up, and the others told, but not all have
        heard yet), the slice waits for it to answer for its keys: the others send it their
        operations on its keys already, and the copy that answered for them meanwhile refuses an
        atomic one sent to it from then on."""
        replicas = self._replicas
        if replicas is not None and replicas.liveness.stepping_up and (self._forward or self._asks):
            return replicas.liveness.stepped_up()  # not replicas: they are merged by version
        if not self._resizing:
            return None
        router = self._router
        cluster = router.cluster
        wanted: dict[tuple[tuple[str, ...], str], str] = {}
        for operation in operations[start:stop]:
            kind = operation.WhichOneof("operation")
            if kind is None or not conditional(kind, request := getattr(operation, kind)):
                continue
            path, key = tuple(request.path), request.key
            scoped = (*self._grant.root, *path)
            if cluster.owner(scoped, key) is not None or router.holds(scoped, key):
                continue
            member = cluster.handoff.previous_owner(scoped, key)
            if member is not None:
                wanted[scoped, key] = member
        return self._take_previous(wanted) if wanted else None

    async def _take_previous(self, wanted: dict[tuple[tuple[str, ...], str], str]) -> None:
        self._unfetched = await self._router.take_previous(wanted)

    def _placed(
        self, replication: Replication, kind: str, request: Any, operation: pb.Operation
    ) -> Answer | None:
        """`elsewhere` with replicas: the first serving copy runs it (see Replication)."""
        router = self._router
        cluster = router.cluster
        path, key = request.path, request.key
        if self._forward:  # a caller's: to the copy that serves the key
            member = replication.serving_copy(path, key)
            if member != cluster.node_id:
                return router.forward(member, operation, self._deadline)
        elif not cluster.topology.holds(cluster.node_id, path, key):
            if self._moving:  # placed by another list: the sender sends it on
                owner = cluster.topology.owner(path, key)
                raise KeyMoved(owner, cluster.topology.members[owner])
        elif not replication.liveness.current and self._asks:
            away = "is stopping" if replication.liveness.leaving else "is catching up after it was away"
            raise NotServing(f"node {cluster.node_id} {away}: {NOT_APPLIED}", node=cluster.node_id)
        elif self._asks and conditional(kind, request):
            # Sent by a node that took this one to answer for the key; if another copy does now
            # (it came back, and this node has heard it), running it here too could count twice.
            serving = replication.serving_copy(path, key)
            if serving != cluster.node_id:
                answers = f"node {cluster.node_id} no longer answers for the key (node {serving} does)"
                raise NotServing(f"{answers}: {NOT_APPLIED}", node=cluster.node_id)
        if _writes(kind, request):
            replication.check_writable(path, key)
        return None

    def after(self, kind: str, request: Any, response: Any, operation: pb.Operation) -> Answer | None:
        replicas = self._replicas
        if kind in READS:
            if replicas is not None:
                if kind == "get" and response.found and request.HasField("renew_for"):
                    return replicas.replicate(request.path, request.key)
                return None
            if self._asks and not found(kind, response):
                member = self._router.cluster.handoff.previous_owner(request.path, request.key)
                if member is not None:
                    return self._router.ask(member, request.path, request.key, operation)
            return None
        if (
            kind != "delete_all"
            and self._grant.forwarded
            and self._router.cluster.owner(request.path, request.key)
        ):
            # A peer placed it by another member list (or this node stands in for a copy that is
            # down): it goes on to its owner (or its copies).
            self._router.cluster.handoff.write_elsewhere(self._version)
        if kind == "delete_all":
            return self._router.fan_out(operation) if self._fan_out else None
        if replicas is not None and kind != "replica" and changed(kind, request, response):
            return replicas.replicate(request.path, request.key)
        return None

    def finish(self, first: pb.PipelineResponse) -> None:
        current = self._router.cluster.topology.version
        if self._version not in ("", current):
            first.topology_version = current  # the caller routes by an older list: it reads ours
        replicas = self._replicas
        if replicas is not None and self._forward and replicas.liveness.down:
            first.members_down.extend(replicas.liveness.down)  # a caller's stream to one may be silent


_SUMMED = (
    "keys",
    "memory_bytes",
    "max_memory_bytes",
    "evictions",
    "expired_keys",
    "keys_first_copy",
    "keys_replica",
    "keys_held_for_others",
    "replication_failures",
)
"""The ServerStats figures a cluster's Stats sums over the nodes."""


def _writes(kind: str, request: Any) -> bool:
    """Whether an operation of `kind` (not delete_all) changes its key: a set, a delete, a renewal."""
    return kind not in READS or (kind == "get" and request.HasField("renew_for"))


def _moved(result: pb.OperationResult) -> bool:
    return result.WhichOneof("result") == "error" and result.error.HasField("moved_to")


def _missed(operation: pb.Operation, result: pb.OperationResult) -> bool:
    """Whether `result` is that of a read that found nothing."""
    kind = operation.WhichOneof("operation")
    if kind not in READS or result.WhichOneof("result") != kind:
        return False
    return not found(kind, getattr(result, kind))


def _error_result(fault: StoreFault) -> pb.OperationResult:
    result = pb.OperationResult()
    put_error(result.error, fault, confined=False)
    return result


async def _all_of(futures: dict[str, asyncio.Future[Any]]) -> pb.OperationResult | None:
    failed = []
    for member, future in futures.items():
        try:
            result: pb.OperationResult = await future
        except Exception as error:
            failed.append(str(failure_of(member, error)))
            continue
        if result.WhichOneof("result") == "error":
            failed.append(f"node {member}: {result.error.message}")
    if not failed:
        return None
    return _error_result(
        Unreachable(
            f"delete_all did not reach {len(failed)} of {len(futures) + 1} nodes, whose keys remain: "
            + "; ".join(failed),
        )
    )
