"""Liveness: which members are up, and whether this node may answer for its keys (its lease).

With --replicas 2 or more, every node pings every other member every
INTERVAL seconds. A member is *up* while it answered a ping sent in the last
DOWN_AFTER seconds (or this node told it, in the last LEASE seconds, that it
sees it: it may still hold a lease from this node). A node is *in touch*
while, counting itself, a majority of the members answered one of its pings
sent in the last LEASE seconds with "I see you": its lease. It is *current*
while in touch and caught up: every gap in its lease (a restart, a pause, a
cut) means copies may have been written around it, so it takes in what the
others hold of its keys (CatchUp) before it answers for them again.

Why the figures hold together: a member stops seeing this node DOWN_AFTER
seconds after its last answered ping, and stops renewing its lease then;
the lease ends LEASE seconds after the ping that renewed it was *sent*. So a
node cut off stops answering for its keys within LEASE (0.5 s) of the cut,
and the others write around it (to a stand-in) only once they take it to be
down (0.7 s), after its lease has lapsed. A paused node's lease has lapsed
when it wakes up: pings answered after the pause were sent after it too.
Nothing here elects anything: each node decides for itself from what it sees.

One copy answers for a key at a time (`serving`): the next copy of a key
answers for it only once this node knows that every copy before it does
not, from one of two things.
- The copy said so: it answered a ping sent in the last LEASE seconds with
  "not current" (catching up, stepping down, leaving). A copy that comes
  back says "current" for LEASE before it answers for its keys (it *steps
  up*), so whatever it said before has run out everywhere by then.
- The copy holds no lease: enough members promised not to grant it one.
  A member promises so (PingResponse.not_granting) of every member it
  granted nothing in the last LEASE seconds (so that holds no lease from it)
  and would grant nothing now (it has not asked lately, or is not heard),
  and keeps the promise for LEASE: it grants that member nothing until
  LEASE after the last time it promised. A lease needs len(members) // 2 grants
  from the others, so promises from len(members) - len(members) // 2 of
  them (this node's own counted), each in answer to a ping sent in the last
  LEASE seconds, leave it none: the two sets cannot both be that large.
A copy cut from this node alone (a partial partition) still holds its lease
through the others: it keeps answering for its keys, and this node refuses
their operations (not applied) rather than answer for them too.

The timing this relies on: the nodes' clocks run at the same rate (not the
same time: every figure is measured on one node's clock), within a small
fraction of LEASE over LEASE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from nestkv.v1 import peer_pb2 as peer_pb

log = logging.getLogger("nestkv.server")

INTERVAL = 0.1
"""Seconds between two pings of a member."""
PING_TIMEOUT = 0.3
"""Seconds a ping may take before it counts as unanswered."""
LEASE = 0.5
"""Seconds this node answers for its keys after the last ping (by its send time) that a majority
answered with "I see you"."""
DOWN_AFTER = 0.7
"""Seconds without an answered ping before a member is taken to be down: longer than LEASE, so
that its lease has lapsed before anyone writes around it."""

Ping = Callable[[str, str], Awaitable[peer_pb.PingResponse]]
"""Ping the member (id, address): its answer, or an exception if none came in time."""


class Liveness:
    """What this node knows of the members' liveness, and its own lease (see the module)."""

    def __init__(
        self,
        node_id: str,
        members: Callable[[], dict[str, str]],
        ping: Ping,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`members()` is the current member list (ids to addresses, this node included)."""
        self.node_id = node_id
        self._members = members
        self._ping = ping
        self._clock = clock
        self._heard: dict[str, float] = {}  # send time of the last ping the member answered
        self._granted: dict[str, float] = {}  # ... that it answered with sees_you
        self._told: dict[str, float] = {}  # when this node last told the member it sees it (granted)
        self._said: dict[str, tuple[float, bool]] = {}  # send time of the last ping the member
        # answered, and whether it said it answers for its keys (current, not leaving)
        self._started = clock()
        self._asked: dict[str, float] = {}  # when the member last pinged this node (asked for a lease)
        self._promised: dict[str, float] = {}  # when this node last promised not to grant it one
        self._promises: dict[str, dict[str, float]] = {}  # of a member, by the member promising:
        # the send time of the last ping it answered with the promise
        self._left: set[str] = set()  # members that said they are stopping
        self._around: dict[str, float] = {}  # when a change was last written around the member
        self._lease_end = 0.0
        self._caught_up = False
        self._caught_up_at = 0.0
        self._away_since = clock()  # when it started, or its lease last lapsed
        self._back_since = clock()  # when its lease last began
        self._stepping_up = False
        self._stepped_up = asyncio.Event()
        self._stepped_up.set()
        self.stepping_down = False
        """Set as this node prepares to stop: its answers to pings say it is not current, so the
        others send its keys' operations to their other copies (and still their replicas here),
        while it runs what they sent before they heard (see Replication.step_down)."""
        self.leaving = False
        """Set when this node stops: the others send its keys' operations elsewhere already."""
        self._pings: dict[str, int] = {}  # pings answered, by sender
        self.pinged = asyncio.Event()
        """Set whenever this node answers a ping."""
        self.lapses = 0
        """Times this node's lease lapsed (a catch-up that saw one during it starts over)."""
        self.changed = asyncio.Event()
        """Set when a member comes up or goes down, or this node's lease lapses."""
        self._up: set[str] = set()
        self.down: tuple[str, ...] = ()
        """The other members that are down (not heard from), or hold no lease (have not asked for
        one), as of this node's last ping answer: told to clients (PipelineResponse.members_down).
        Not one that only said it is not current: it answers, and its answers may take a while
        (a batch waits while it steps up)."""

    # This node.

    def in_touch(self) -> bool:
        """Whether this node's lease holds: a majority of the members see it."""
        if len(self._members()) <= 1:
            return True
        if self._clock() < self._lease_end:
            return True
        self._lapsed()
        return False

    @property
    def caught_up(self) -> bool:
        """This node took in what the others hold of its keys since its lease last lapsed, and
        since a member last said it wrote changes of them to a stand-in instead."""
        return self._caught_up

    @caught_up.setter
    def caught_up(self, caught_up: bool) -> None:
        if caught_up and not self._caught_up:
            self._caught_up_at = self._clock()
        self._caught_up = caught_up

    @property
    def stepping_up(self) -> bool:
        """Set for LEASE once this node has caught up: its answers to pings say it is current, so
        the others stop answering for its keys, while it does not answer for them itself yet
        (see Replication._step_up): one copy answers at a time."""
        return self._stepping_up

    @stepping_up.setter
    def stepping_up(self, stepping: bool) -> None:
        self._stepping_up = stepping
        if stepping:
            self._stepped_up.clear()
        else:
            self._stepped_up.set()

    async def stepped_up(self) -> None:
        """Return once this node no longer steps up (it answers for its keys, or its lease lapsed),
        or after LEASE at most (the longest a step up takes)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LEASE):
                await self._stepped_up.wait()

    @property
    def current(self) -> bool:
        """Whether this node answers for its keys: in touch, caught up since it last was not, heard
        by the others since, and not leaving (stopping)."""
        return self._caught_up_and_staying() and not self.stepping_up

    def _caught_up_and_staying(self) -> bool:
        """In touch, caught up since it last was not, and not leaving: what its ping answers call
        current but while it steps down, and what it answers for its keys by once it has stepped up."""
        return self.in_touch() and self.caught_up and not self.leaving

    def _lapsed(self, why: str = "lease lapsed") -> None:
        if self.caught_up or self._lease_end:
            if self.caught_up and not self.leaving:  # once per time away (catching up, it lapses again
                # at each ping); leaving, it stopped asking
                log.warning("%s: this node answers for no key until caught up", why)
            self.lapses += 1
            self.changed.set()
            self._away_since = self._clock()
        self.caught_up = False
        self.stepping_up = False
        self._lease_end = 0.0

    def _others(self) -> dict[str, str]:
        """The other members of the current list, and their addresses."""
        return {member: address for member, address in self._members().items() if member != self.node_id}

    def _renew(self) -> None:
        needed = len(self._members()) // 2  # others that must see this node: with it, a majority
        others = self._others()
        granted = sorted((self._granted.get(member, 0.0) for member in others), reverse=True)
        if not needed or len(granted) < needed:
            return
        now = self._clock()
        if self._lease_end and now >= self._lease_end:
            self._lapsed()  # it lapsed before this renewal came: a gap all the same
        end = granted[needed - 1] + LEASE
        if end > now:
            if not self._lease_end:
                self._back_since = now
            self._lease_end = max(self._lease_end, end)

    def knows_who_is_up(self) -> bool:
        """Whether a member this node takes to be down is one: every member answered since this
        node started or its lease lapsed, or its lease has held DOWN_AFTER since (its pings went
        out all that time: a member that did not answer is down, not unheard yet)."""
        if self._lease_end and self._clock() - self._back_since >= DOWN_AFTER:
            return True
        since = self._away_since
        return all(self._heard.get(member, 0.0) >= since for member in self._others())

    def sees_me_again(self, member: str) -> bool:
        """Whether `member` answered that it sees this node, to a ping sent since this node started
        or its lease lapsed: from then on it sends this node every change to its keys, so what it
        holds now is all this node must take in from it."""
        return self._granted.get(member, 0.0) >= self._away_since

    # The other members.

    def up(self, member: str) -> bool:
        """Whether `member` is up (this node always is); one that said it is stopping is not."""
        if member == self.node_id:
            return True
        if member in self._left:
            return False
        now = self._clock()
        return now - self._heard.get(member, -DOWN_AFTER) < DOWN_AFTER or (
            now - self._told.get(member, -LEASE) < LEASE
        )

    def serving(self, member: str) -> bool:
        """Whether `member` may answer for its keys: unless this node knows it does not (see the
        module). This node answers for its own while current and not stepping down."""
        if member == self.node_id:  # stepping down, it has told the others it no longer answers
            return self.current and not self.stepping_down
        now = self._clock()
        sent, current = self._said.get(member, (-LEASE, True))
        if not current and now - sent < LEASE:
            return False  # it said so lately
        return not self._unleased(member, now)

    def says_current(self, member: str) -> bool:
        """Whether `member` said it answers for its keys, in its last answer to a ping."""
        return self._said.get(member, (0.0, False))[1]

    def _unleased(self, member: str, now: float) -> bool:
        """Whether enough members promise not to grant `member` a lease that it holds none."""
        members = self._members()
        if member not in members:
            return True
        needed = len(members) - len(members) // 2
        promised = 1 if self._promise(member, now) else 0  # this node's own, kept from now on
        for promiser, sent in self._promises.get(member, {}).items():
            if now - sent < LEASE and promiser in members and promiser != self.node_id:  # not its own
                promised += 1
        return promised >= needed

    def _not_granting(self, now: float) -> list[str]:
        """The members this node promises not to grant a lease for LEASE from `now`."""
        return [member for member in self._others() if self._promise(member, now)]

    def _promise(self, member: str, now: float) -> bool:
        """Promise `member` no lease for LEASE from `now`, if this node can: it granted it none in
        the last LEASE seconds (nor, as far as it knows, before it started), and would grant it
        none now: it has not asked for one lately, or this node does not hear it."""
        if now - self._told.get(member, self._started) < LEASE:
            return False
        asking = now - self._asked.get(member, -LEASE) < LEASE
        if asking and now - self._heard.get(member, -DOWN_AFTER) < DOWN_AFTER:
            return False  # it is to be granted one, once the last promise has run out
        self._promised[member] = now
        return True

    def wrote_around(self, member: str) -> None:
        """A change `member` keeps a copy of went to a stand-in instead (it was down, or did not
        store it in time): it is told so (PingResponse.written_around) until it catches up from
        this node, so that it catches up before it answers for its keys again."""
        self._around[member] = self._clock()

    def catching_up(self, member: str) -> None:
        """`member` asks for what this node holds of its keys: what was written around it so far
        is in that, or at the stand-in, which it asks too."""
        self._around.pop(member, None)

    def answer(self, sender: str) -> peer_pb.PingResponse:
        """The answer to a ping from `sender`."""
        now = self._clock()
        self._asked[sender] = now
        sees = now - self._heard.get(sender, -DOWN_AFTER) < DOWN_AFTER
        sees = sees and now - self._promised.get(sender, -LEASE) >= LEASE  # a promise is kept
        if sees:
            self._told[sender] = now
        self._pings[sender] = self._pings.get(sender, 0) + 1
        self.pinged.set()
        # Stepping up, it says it is current (the others stop answering for its keys); stepping
        # down, that it is not (they start).
        current = self._caught_up_and_staying() and not self.stepping_down
        return peer_pb.PingResponse(
            current=current,
            sees_you=sees,
            leaving=self.leaving,
            not_granting=self._not_granting(now),
            written_around=sender in self._around,
        )

    def pings_answered(self, member: str) -> int:
        """How many pings from `member` this node has answered."""
        return self._pings.get(member, 0)

    async def heard_by_all(self, members: Iterable[str]) -> None:
        """Return once each of `members` that is up has taken in this node's answer to a ping from
        now on: it pinged twice since (a member pings again only once it took in the answer to
        its last ping), or at most DOWN_AFTER (a member that does not ping is down by then)."""
        since = {member: self.pings_answered(member) for member in members}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DOWN_AFTER):
                while not all(
                    self.pings_answered(member) >= answered + 2 or not self.up(member)
                    for member, answered in since.items()
                ):
                    self.pinged.clear()
                    await self.pinged.wait()

    async def ping_forever(self) -> None:
        """Ping every other member every INTERVAL seconds, until cancelled."""
        pinging: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                for member, address in self._others().items():
                    if self.leaving:  # it needs no lease: the others promise so, and take its keys
                        break
                    if member not in pinging or pinging[member].done():
                        pinging[member] = asyncio.create_task(self._ping_once(member, address))
                self._notice()
                await asyncio.sleep(INTERVAL)
        finally:
            for task in pinging.values():
                task.cancel()
            await asyncio.gather(*pinging.values(), return_exceptions=True)

    async def _ping_once(self, member: str, address: str) -> None:
        sent = self._clock()
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                answer = await self._ping(member, address)
        except Exception:  # unanswered: the member goes down once DOWN_AFTER passes
            return
        self._heard[member] = max(self._heard.get(member, 0.0), sent)
        self._said[member] = (sent, answer.current and not answer.leaving)
        for promised in answer.not_granting:
            promises = self._promises.setdefault(promised, {})
            promises[member] = max(promises.get(member, 0.0), sent)
        if answer.leaving:
            self._left.add(member)
        else:
            self._left.discard(member)
        if answer.sees_you:
            self._granted[member] = max(self._granted.get(member, 0.0), sent)
            self._renew()
        if answer.written_around and self.caught_up and sent >= self._caught_up_at:
            # It wrote changes of this node's keys to a stand-in since this node last caught up
            # from it (an answer to a ping sent before may say so of what that took in already).
            self._lapsed(f"{member} wrote changes of this node's keys to a stand-in")
        self._notice()

    def _down(self) -> tuple[str, ...]:
        """The other members not up (as `_notice` found them), or that hold no lease."""
        now = self._clock()
        return tuple(
            member for member in self._others() if member not in self._up or self._unleased(member, now)
        )

    def _notice(self) -> None:
        """Set `changed` if a member came up or went down, or this node's lease lapsed; and `down`."""
        self.in_touch()
        up = {member for member in self._members() if self.up(member)}
        if up != self._up:
            came, went = up - self._up, self._up - up
            if went:
                log.warning("taken to be down: %s", ", ".join(sorted(went)))
            if came and self._up:
                log.info("up again: %s", ", ".join(sorted(came)))
            self._up = up
            self.changed.set()
        self.down = self._down()


async def wait_changed(liveness: Liveness, seconds: float) -> None:
    """Wait until `liveness` changes, or `seconds`."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
    # comes as the event is set, and a task looping on it then never ends (a node's close hung).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await liveness.changed.wait()
    liveness.changed.clear()
