"""Replicas (--replicas 2 or more): where a key's operations run, how its writes reach its copies,
and how a node that was away catches up.

A key's copies are the first R members of its placement order; when a copy
is down (nestkv.server.cluster.liveness), the next member in that order
stands in for it. An operation runs on the first copy that may be *serving*
(Liveness.serving: this node cannot rule it out), so one copy answers for a
key at a time; if that copy is another node this node cannot reach, the
operation fails, not applied. A write runs there, then goes as a `replica`
(the key's new state and version, merged by version on arrival) to the other copies that
are up, and to stand-ins for those that are not; it is answered once
--min-copies hold it. A copy that does not store it within REPLICA_TIMEOUT
is replaced by the next stand-in.

If fewer members than --min-copies are up before a write runs, it fails and
is applied nowhere ("not applied"). Once it ran here, a failure to reach
enough copies leaves it here (it reaches the others when they are back):
its outcome is unknown to the caller, and the error says so.

A node whose lease lapsed (restarted, paused, cut off) answers for nothing
until it has caught up: it asks every member that is up for what it holds
of its keys (the CatchUp RPC), merges it, gives each what it holds of that
member's keys (copies converge both ways), then steps up: it says it is
current, and answers for its keys LEASE later, once what it said before
has run out everywhere. A node whose change of a key went to a stand-in
instead of a copy tells that copy so until it catches up from it. A stand-in
hands what it held for a copy back by the hand-off pass, which runs
whenever a member comes back up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nestkv.server.cluster.liveness import INTERVAL, LEASE, PING_TIMEOUT, Liveness, wait_changed
from nestkv.server.cluster.peers import REPLICA_TIMEOUT, failure_of
from nestkv.server.errors import NoServingCopy, NotServing, ReplicationIncomplete, TooFewCopies
from nestkv.server.router import Answer
from nestkv.server.status import put_error
from nestkv.server.storage import NEVER, NamespacedStorage
from nestkv.v1 import store_pb2 as pb

if TYPE_CHECKING:
    from nestkv.server.cluster.node import Cluster

log = logging.getLogger("nestkv.server")

LEAVE_NOTICE = 3 * INTERVAL + PING_TIMEOUT
"""Seconds a node stopping says it is not current before it stops: every member pings it meanwhile."""

ROLES = ("first_copy", "replica", "held_for_others")
"""What a key held here is to this node: its first copy, another copy, or neither (a stand-in's, or
one on its way to its copies)."""

CENSUS_INTERVAL = 60.0
"""Seconds between two counts of the keys by role (a walk of every key: a few seconds of CPU for
a million keys, so not more often)."""

STEP_DOWN_WAIT = 10.0
"""Seconds a node stopping waits for the other members up to be current before it steps down."""

NOT_APPLIED = "not applied"
"""Said, for people, by a refusal that left the write applied nowhere (its fault says so to
programs: nestkv.server.errors.FAULTS)."""


class Replication:
    """One node's side of replicas: placement by liveness, replicas sent, catching up."""

    def __init__(
        self, cluster: Cluster, storage: NamespacedStorage, liveness: Liveness, min_copies: int
    ) -> None:
        """`cluster`: the node's Cluster (its members, peers and hand-off)."""
        self._cluster = cluster
        self._storage = storage
        self.liveness = liveness
        self.min_copies = min_copies
        self.failures = 0
        """Replicas not stored by a copy or stand-in (it did not answer, or failed)."""
        self.roles = dict.fromkeys(ROLES, 0)
        """Keys held by this node, by role, as last counted (`count_roles_forever`)."""
        self._left: set[asyncio.Future[Any]] = set()

    # Where an operation runs.

    def serving_copy(self, path: Sequence[str], key: str) -> str:
        """The copy of the key that answers for it now: the first that may (Liveness.serving).
        Raises NoServingCopy if none may, or NotServing if that one is another node
        this node cannot reach (and so may not answer for the key in its place)."""
        topology = self._cluster.topology
        liveness = self.liveness
        serving = liveness.serving
        owner = topology.owner(path, key)
        if serving(owner) and (owner == self._cluster.node_id or liveness.up(owner)):
            return owner  # the common case: no ranking of every member
        copies = topology.copies(path, key)
        for copy in copies:
            if serving(copy):
                if copy != self._cluster.node_id and not liveness.up(copy) and liveness.knows_who_is_up():
                    raise NotServing(  # a partial partition: it holds its lease through the others
                        f"node {copy} answers for the key, as far as the others can tell, and "
                        f"this node has not heard from it lately: {NOT_APPLIED}",
                        node=copy,
                    )
                return str(copy)
        raise NoServingCopy(f"no copy of the key is up and current ({self._describe(copies)}): {NOT_APPLIED}")

    def check_writable(self, path: Sequence[str], key: str) -> None:
        """Raise TooFewCopies if fewer members than --min-copies are up
        to store a write of the key (its copies, then stand-ins)."""
        topology = self._cluster.topology
        up = self.liveness.up
        members = topology.members
        if len(members) - sum(1 for member in members if not up(member)) >= self.min_copies:
            return  # the common case: no ranking of every member
        ranked = topology.ranked(path, key)
        if sum(1 for member in ranked if up(member)) >= min(self.min_copies, len(ranked)):
            return
        down = [member for member in ranked if not up(member)]
        raise TooFewCopies(
            f"a write needs {self.min_copies} copies and only {len(ranked) - len(down)} of the "
            f"{len(ranked)} nodes are up (down: {', '.join(down)}): {NOT_APPLIED}",
        )

    def _describe(self, copies: list[str]) -> str:
        liveness = self.liveness
        return ", ".join(f"{copy} {'not current' if liveness.up(copy) else 'down'}" for copy in copies)

    # Replicas sent.

    def replicate(self, path: Sequence[str], key: str) -> Answer | None:
        """Send the key's state here (just written) to its other copies, or stand-ins for those
        down or too slow, until --min-copies hold it. The answer: None once they do, else an
        error result (the write stays here: its outcome is unknown); no answer (None) if there is
        nothing to send. A replica carries no deadline: merged by version, a late one does no harm,
        and one refused for lateness would leave its copy behind."""
        operation = self._replica_of(path, key)
        if operation is None:
            return None
        cluster = self._cluster
        topology = cluster.topology
        members = topology.members
        up = self.liveness.up
        needed = min(self.min_copies, len(members)) - 1
        candidates = [member for member in topology.ranked(path, key) if member != cluster.node_id]
        wanted = topology.replicas - 1  # the other copies, or stand-ins for them
        sending: dict[asyncio.Future[Any], str] = {}
        for index, member in enumerate(candidates):
            if len(sending) == wanted:
                break
            if up(member):
                sending[cluster.peers.forward(members[member], operation, "replica")] = member
            elif index < wanted:  # a copy down: a stand-in takes its replica
                self.liveness.wrote_around(member)
        if len(sending) == needed == 1:
            # The common case (two copies): one answer to wait for. A future, not a coroutine: a
            # batch's answers are gathered, and gathering coroutines makes a task of each write.
            [(future, member)] = sending.items()
            answer: asyncio.Future[pb.OperationResult | None] = asyncio.get_running_loop().create_future()

            def stored(future: asyncio.Future[Any]) -> None:
                if _problem(member, future) is None:
                    if not answer.done():
                        answer.set_result(None)
                    return
                slowly = asyncio.ensure_future(self._replicate(operation, candidates, sending, needed))
                slowly.add_done_callback(functools.partial(_pass_on, answer))

            future.add_done_callback(stored)
            return answer
        return self._replicate(operation, candidates, sending, needed)

    async def _replicate(
        self,
        operation: pb.Operation,
        candidates: list[str],
        sending: dict[asyncio.Future[Any], str],
        needed: int,
    ) -> pb.OperationResult | None:
        """`replicate`'s waiting: for `needed` of the replicas `sending` to be stored, a stand-in
        sent for each that is not (from `candidates`, in order)."""
        cluster = self._cluster
        node_id = cluster.node_id
        members = cluster.topology.members
        up = self.liveness.up
        failed: list[str] = []
        stored = 0
        pending = set(sending)
        while pending and stored < needed:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                member = sending[future]
                problem = _problem(member, future)
                if problem is None:
                    stored += 1
                    continue
                self.failures += 1
                failed.append(problem)
                self.liveness.wrote_around(member)
                for standby in candidates:  # the next one not asked yet stands in
                    if standby not in sending.values() and up(standby):
                        again = cluster.peers.forward(members[standby], operation, "replica")
                        sending[again] = standby
                        pending.add(again)
                        break
        for future in pending:  # enough copies have it: the others' answers come to nobody
            self._left.add(future)
            future.add_done_callback(self._settle)
        if stored >= needed:
            return None
        result = pb.OperationResult()
        reached = ", ".join(sorted({*(m for f, m in sending.items() if f.done() and _ok(f)), node_id}))
        fault = ReplicationIncomplete(
            f"the write is stored on {stored + 1} of the {needed + 1} copies it needs ({reached}); "
            f"{'; '.join(failed) or 'too few nodes are up'}: its outcome is unknown (it stays where "
            "it is stored, and reaches the other copies when they are back)",
        )
        put_error(result.error, fault, confined=False)
        return result

    def _settle(self, future: asyncio.Future[Any]) -> None:
        self._left.discard(future)
        if _problem("", future) is not None:
            self.failures += 1

    def _replica_of(self, path: Sequence[str], key: str) -> pb.Operation | None:
        """A replica operation carrying the key's state here: its value or its tombstone."""
        storage = self._storage
        entry = storage.get_entry(path, key)
        if entry is not None:
            value, version, left = entry
            replica = pb.ReplicaRequest(path=path, key=key, value=value, version=version)
            if left != NEVER:
                replica.expires_in.FromNanoseconds(max(1_000_000, int(left * 1e9)))
            return pb.Operation(replica=replica)
        tombstones = storage.tombstones
        buried = None if tombstones is None else tombstones.over(path, key)
        if buried is None:
            return None
        return pb.Operation(replica=pb.ReplicaRequest(path=path, key=key, version=buried, deleted=True))

    async def step_down(self, end_callers_streams: Callable[[], None]) -> None:
        """Before this node stops: it tells the others it is not current while it still runs what
        they forward, then refuses their operations, ends its callers' streams (they send to
        other copies), and waits for the others to have heard it, so that operations on its keys
        go to their other copies meanwhile."""
        liveness = self.liveness
        others = self._cluster.others()
        # Not while another member catches up (a rolling restart, the node before): its keys'
        # only serving copy may be this one. A member down is waited for no longer than that.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STEP_DOWN_WAIT):
                while not all(liveness.says_current(member) or not liveness.up(member) for member in others):
                    await wait_changed(liveness, INTERVAL)
        # A member forwarding to this node as it starts to refuse would fail its caller's
        # operation: first every member up hears that it is not current, from its answers to their
        # pings. A member pings again only once it took in the answer to its last ping, so two
        # pings answered since mean it forwards nothing more here.
        liveness.stepping_down = True
        await liveness.heard_by_all(others)
        liveness.leaving = True
        end_callers_streams()
        log.info("stepping down: the other copies answer for this node's keys from now on")
        await asyncio.sleep(LEAVE_NOTICE)

    # Counting.

    async def count_roles_forever(self, interval: float = CENSUS_INTERVAL) -> None:
        """Count the keys held here by role every `interval` seconds (at once first), until cancelled."""
        while True:
            await self.count_roles()
            await asyncio.sleep(interval)

    async def count_roles(self) -> None:
        cluster = self._cluster
        node_id = cluster.node_id
        topology = cluster.topology
        counts = dict.fromkeys(ROLES, 0)
        looked = 0
        for path, node in list(self._storage.namespaces()):
            for key, _ in self._storage.entries(node):
                looked += 1
                if looked % 2_000 == 0:
                    await asyncio.sleep(0)
                copies = topology.copies(path, key)
                role = "first_copy" if copies[0] == node_id else "replica" if node_id in copies else ""
                counts[role or "held_for_others"] += 1
        self.roles = counts

    # Catching up.

    async def catch_up_forever(self) -> None:
        """Catch up whenever this node's lease lapsed and holds again; hand back what this node
        stood in for whenever a member comes up. Until cancelled."""
        liveness = self.liveness
        cluster = self._cluster
        up: set[str] = set()
        while True:
            now_up = {member for member in cluster.topology.members if liveness.up(member)}
            if now_up - up:
                cluster.handoff.again()  # keys held for a member that is back go to it
            up = now_up
            # Catching up takes what every member up holds: only once a member not heard from is
            # known to be down (else a copy of a key, not heard from yet, would be passed over).
            if not liveness.caught_up and liveness.in_touch() and liveness.knows_who_is_up():
                lapses = liveness.lapses
                if await self._catch_up() and lapses == liveness.lapses and liveness.in_touch():
                    await self._step_up()
                    if lapses == liveness.lapses and liveness.current:
                        log.info("caught up: this node answers for its keys again")
                    continue
            await wait_changed(liveness, INTERVAL)

    async def _step_up(self) -> None:
        """Caught up: say so to the others, and answer for this node's keys LEASE later, once what
        it said before (not current) has run out everywhere (nestkv.server.cluster.liveness).
        Until then the copy that answered for them meanwhile may still run what it was sent;
        once it hears, it sends them here, and refuses an atomic operation forwarded to it
        (nestkv.server.cluster.router): at most one copy runs a key's atomic operations at a time.
        (A replica that copy sent before it heard must arrive within the LEASE: the timing this
        relies on, as the README says; one that never arrives went to a stand-in instead, and
        this node is told so, and catches up again.)"""
        liveness = self.liveness
        liveness.caught_up = True
        liveness.stepping_up = True
        await asyncio.sleep(LEASE)
        liveness.stepping_up = False

    async def _catch_up(self) -> bool:
        """Merge what every member that is up holds of this node's keys, then give each what this
        node holds of its keys (copies converge both ways: a change only this node kept, say
        while another copy lost what it had not written to disk, reaches the others); whether
        all answered."""
        cluster = self._cluster
        liveness = self.liveness
        others = {member: address for member, address in cluster.others().items() if liveness.up(member)}
        if not all(liveness.sees_me_again(member) for member in others):
            # A change made before a member saw this node again went to a stand-in: it is in what
            # that member holds only once it sees this node (later changes come here too).
            return False
        results = await asyncio.gather(
            *(self._catch_up_from(member, address) for member, address in others.items()),
            return_exceptions=True,
        )
        if not results or not any(isinstance(result, BaseException) for result in results):
            results = await asyncio.gather(
                *(self._give_to(member, address) for member, address in others.items()),
                return_exceptions=True,
            )
        missing = [
            f"{member}: {result}"
            for member, result in zip(others, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if missing:
            log.info("catching up did not reach every node yet: %s", "; ".join(missing))
        return not missing

    async def _catch_up_from(self, member: str, address: str) -> None:
        cluster = self._cluster
        async for message in cluster.peers.catch_up(address, cluster.topology.version):
            cluster.take(member, message)

    async def _give_to(self, member: str, address: str) -> None:
        """Send `member` what this node holds of its keys, to merge by version (a HandOff that
        moves nothing: this node keeps its copies)."""
        cluster = self._cluster
        await cluster.peers.hand_off(address)(cluster.handoff.copies_for(member))


def _pass_on(answer: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Give `answer` the outcome of `done`."""
    if answer.done():
        return
    if done.cancelled():
        answer.cancel()
    elif (error := done.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())


def _ok(future: asyncio.Future[Any]) -> bool:
    return _problem("", future) is None


def _problem(member: str, future: asyncio.Future[Any]) -> str | None:
    """Why a replica sent to `member` was not stored; None: it was."""
    if future.cancelled():
        return f"node {member}: cancelled"
    error = future.exception()
    if error is not None:
        return str(failure_of(member, error, REPLICA_TIMEOUT))
    result: pb.OperationResult = future.result()
    if result.WhichOneof("result") == "error":
        return f"node {member}: {result.error.message}"
    return None
