"""Versions, tombstones and merge, driven directly with fake clocks."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestkv.server.errors import QuotaExceeded, StoreFault, StoreFull
from nestkv.server.storage import NEVER, NamespacedStorage
from nestkv.server.storage.clock import LEGACY, HybridClock, clock_of, milliseconds_of
from nestkv.server.storage.tombstones import Tombstones
from nestkv.server.storage.tree import version_of


class Wall:
    """A wall clock the test sets, even backwards."""

    def __init__(self, seconds: float = 1_800_000_000.0) -> None:
        self.seconds = seconds

    def __call__(self) -> float:
        return self.seconds


def stored_version(storage: NamespacedStorage, path: tuple[str, ...], key: str) -> bytes | None:
    for here, node in storage.namespaces():
        if here == path and key in node.entries:
            return version_of(node.entries[key])
    return None


# The clock


def test_the_clock_follows_the_wall_clock_and_never_repeats_itself() -> None:
    wall = Wall()
    clock = HybridClock("a", wall)
    first = clock.now()
    assert milliseconds_of(first) == 1_800_000_000_000
    second = clock.now()  # the same millisecond: the counter runs
    assert second > first
    assert milliseconds_of(second) == milliseconds_of(first)
    wall.seconds += 1
    assert milliseconds_of(clock.now()) == 1_800_000_001_000


def test_the_clock_never_goes_back_when_the_wall_clock_does() -> None:
    wall = Wall()
    clock = HybridClock("a", wall)
    before = clock.now()
    wall.seconds -= 3600
    after = [clock.now() for _ in range(1000)]
    assert before < after[0]
    assert after == sorted(after)
    assert len(set(after)) == 1000


def test_the_clock_runs_ahead_of_a_version_it_observes() -> None:
    clock = HybridClock("a", Wall())
    ahead = HybridClock("b", Wall(1_800_000_060.0)).now()  # a peer a minute ahead
    clock.observe(ahead)
    assert clock.now() > ahead


def test_the_node_breaks_ties_between_equal_clocks() -> None:
    a, b = HybridClock("a", Wall()).now(), HybridClock("b", Wall()).now()
    assert a != b
    assert clock_of(a) == clock_of(b)


def test_the_clock_starts_above_its_persisted_bound_after_a_restart_with_the_wall_clock_set_back() -> None:
    wall = Wall()
    saved: list[int] = []
    clock = HybridClock("a", wall, persist=saved.append)
    last = max(clock.now() for _ in range(10))
    assert saved
    assert saved[-1] > clock_of(last)
    wall.seconds -= 3600  # the machine restarts with its clock an hour behind
    restarted = HybridClock("a", wall, persist=saved.append)
    restarted.start_above(saved[-1])
    assert restarted.now() > last


def test_the_bound_is_persisted_every_few_seconds_at_most() -> None:
    wall = Wall()
    saved: list[int] = []
    clock = HybridClock("a", wall, persist=saved.append)
    for _ in range(100):
        clock.now()
        wall.seconds += 0.01
    assert len(saved) == 1  # one second of stamps: within the 10 s the first bound covers


# Stamping and merging


def test_every_change_gets_a_newer_version() -> None:
    storage = NamespacedStorage(lambda: 0.0, tombstones=Tombstones(3600, 1000))
    storage.set(("ns",), "k", b"1", ttl=10)
    first = stored_version(storage, ("ns",), "k")
    storage.get(("ns",), "k", renew_for=20)
    renewed = stored_version(storage, ("ns",), "k")
    storage.delete(("ns",), "k")
    assert first is not None
    assert renewed is not None
    assert renewed > first
    buried = storage.tombstones.over(("ns",), "k") if storage.tombstones else None
    assert buried is not None
    assert buried > renewed


def test_a_merged_copy_wins_only_if_it_is_newer() -> None:
    here, elsewhere = NamespacedStorage(), NamespacedStorage(versions=HybridClock("b"))
    elsewhere.set(("ns",), "k", b"older")
    older = stored_version(elsewhere, ("ns",), "k")
    here.set(("ns",), "k", b"newer")
    assert older is not None
    assert not here.merge(("ns",), "k", older, b"older")
    assert here.get(("ns",), "k") == b"newer"
    newest = here.versions.now()
    assert here.merge(("ns",), "k", newest, b"newest")
    assert here.get(("ns",), "k") == b"newest"
    here.set(("ns",), "k", b"after")
    assert (stored_version(here, ("ns",), "k") or b"") > newest


def test_a_delete_beats_a_copy_of_the_same_version_and_older_ones() -> None:
    storage = NamespacedStorage(tombstones=Tombstones(3600, 1000))
    version = storage.versions.now()
    assert storage.merge(("ns",), "k", version) is False  # nothing to remove, but it is remembered
    assert not storage.merge(("ns",), "k", version, b"same change")
    assert not storage.merge(("ns",), "k", LEGACY, b"older")
    assert storage.get(("ns",), "k") is None


def test_a_subtree_tombstone_drops_older_copies_of_any_key_below_it() -> None:
    storage = NamespacedStorage(tombstones=Tombstones(3600, 1000))
    older = storage.versions.now()
    storage.set(("a", "b"), "newer", b"kept")
    storage.delete_all(("a",))
    storage.set(("a", "b"), "newest", b"kept")
    assert not storage.merge(("a", "b", "c"), "k", older, b"old")
    assert storage.get(("a", "b"), "newest") == b"kept"
    assert storage.get(("a", "b"), "newer") is None


def test_an_expired_entry_leaves_a_tombstone_of_its_own_version_aged_from_the_expiry() -> None:
    now = [0.0]
    wall = Wall()
    storage = NamespacedStorage(
        lambda: now[0], versions=HybridClock("a", wall), tombstones=Tombstones(3600, 1000, wall)
    )
    older = storage.versions.now()
    storage.set(("ns",), "k", b"short", ttl=1)
    version = stored_version(storage, ("ns",), "k")
    now[0] = 5
    wall.seconds += 7200  # written two hours before it expired: its tombstone is young all the same
    assert storage.get(("ns",), "k") is None
    storage.reap()
    assert storage.tombstones is not None
    assert storage.tombstones.over(("ns",), "k") == version
    assert not storage.merge(("ns",), "k", older, b"older, with a later deadline", NEVER)


def test_merging_a_subtree_delete_keeps_the_newer_entries_below_it() -> None:
    storage = NamespacedStorage()
    storage.set(("a",), "old", b"1")
    version = storage.versions.now()
    storage.set(("a", "b"), "new", b"2")
    assert storage.merge_subtree(("a",), version) == 1
    assert storage.get(("a",), "old") is None
    assert storage.get(("a", "b"), "new") == b"2"


def test_tombstones_are_collected_by_age_only_and_counted_in_memory() -> None:
    wall = Wall()
    tombstones = Tombstones(age=60, limit=3, wall=wall)
    storage = NamespacedStorage(versions=HybridClock("a", wall), tombstones=tombstones)
    empty = storage.used_memory
    storage.delete(("ns",), "one")
    assert storage.used_memory > empty
    assert len(tombstones) == 1
    wall.seconds += 30
    for key in ("two", "three"):
        storage.delete(("ns",), key)
    with pytest.raises(StoreFull, match=r"removes nothing here.*holds 3 tombstones, its --max-tombstones"):
        storage.delete(("ns",), "four")
    storage.delete(("ns",), "one")  # buried again in place: no new tombstone
    storage.set(("ns",), "held", b"v")
    storage.delete(("ns",), "held")  # removes a value: taken past the limit
    assert len(tombstones) == 4
    wall.seconds += 40
    storage.reap()  # all younger than 60 s ("one" was buried again): none goes before its age
    assert len(tombstones) == 4
    wall.seconds += 30
    storage.reap()
    assert len(tombstones) == 0
    assert storage.used_memory == empty


def deletes_until_refused(storage: NamespacedStorage, path: tuple[str, ...]) -> StoreFault:
    """Delete keys nobody holds at `path` until one is refused: that fault."""
    for number in range(10_000):
        try:
            storage.delete(path, f"never-{number}")
        except StoreFault as refused:
            return refused
    raise AssertionError("10,000 deletes of keys nobody holds, and none refused")


def test_a_delete_that_removes_nothing_is_refused_when_its_tombstone_does_not_fit() -> None:
    storage = NamespacedStorage(max_memory=20_000, tombstones=Tombstones(3600, 1_000_000))
    assert storage.tombstones is not None
    refused = deletes_until_refused(storage, ("ns",))
    assert "removes nothing here" in str(refused)
    kept = len(storage.tombstones)
    assert 0 < kept < 200
    assert storage.used_memory <= 20_000
    with pytest.raises(StoreFull):  # full of tombstones: none is dropped early to make room
        storage.set(("ns",), "late", b"v" * 1000)
    assert len(storage.tombstones) == kept
    with pytest.raises(StoreFull, match="this namespace holds nothing here"):
        storage.delete_all(("empty",))


def test_tombstones_count_in_the_quota_of_every_namespace_above_them() -> None:
    storage = NamespacedStorage(tombstones=Tombstones(3600, 1_000_000))
    storage.quotas = {("tenant",): 4_000}
    storage.set(("tenant",), "kept", b"v" * 100)
    before = storage.quota_at(("tenant", "deep"))
    assert before is not None
    refused = deletes_until_refused(storage, ("tenant", "deep"))
    assert isinstance(refused, QuotaExceeded)
    assert re.search(r"removes nothing here.*over its quota of 4000 B", str(refused))
    after = storage.quota_at(("tenant",))
    assert after is not None
    assert before[2] < after[2] <= 4_000
    assert storage.get(("tenant",), "kept") == b"v" * 100
    storage.delete(("tenant",), "kept")  # a delete of what is held is never refused
    storage.delete(("other",), "never")  # another namespace's quota (none) is its own
    storage.quotas = {("tenant",): 4_000, ("tenant", "deep"): 100_000}  # counted again when quotas change
    deep = storage.quota_at(("tenant", "deep"))
    assert deep is not None
    assert deep[2] > 0


def test_copies_made_elsewhere_are_never_refused_for_quotas_or_memory() -> None:
    writer = NamespacedStorage(versions=HybridClock("w"))
    copy = NamespacedStorage(max_memory=20_000, tombstones=Tombstones(3600, 1))
    copy.quotas = {("tenant",): 1_000}
    for number in range(50):
        version = writer.set(("tenant",), f"k{number}", b"v" * 500)
        assert copy.merge(("tenant",), f"k{number}", version, b"v" * 500)
        copy.merge(("tenant",), f"gone{number}", writer.versions.now())  # tombstones too
    assert copy.count(("tenant",)) == 50
    assert copy.tombstones is not None
    assert len(copy.tombstones) == 50  # past --max-tombstones
    assert copy.over_memory > 0
    assert copy.used_memory == copy.max_memory + copy.over_memory


# Merge converges: any order, any number of times


Change = tuple[str, int, tuple[str, ...], str]  # kind, stamp, path, key


def _version(stamp: int, node: int) -> bytes:
    return (stamp << 16).to_bytes(8, "big") + node.to_bytes(8, "big")


PATHS = [("a",), ("a", "b"), ("c",)]
KEYS = ["x", "y"]
changes = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "delete", "delete_all"]),
        st.integers(1, 5),  # few stamps: ties between nodes happen
        st.integers(0, 2),  # the node that stamped it
        st.sampled_from(PATHS),
        st.sampled_from(KEYS),
    ),
    max_size=12,
)


def _apply(storage: NamespacedStorage, change: tuple[str, int, int, tuple[str, ...], str]) -> None:
    kind, stamp, node, path, key = change
    version = _version(stamp, node)
    if kind == "set":
        storage.merge(
            path, key, version, b"%d@%d:%s/%s" % (stamp, node, "/".join(path).encode(), key.encode())
        )
    elif kind == "delete":
        storage.merge(path, key, version)
    else:
        storage.merge_subtree(path, version)


def _state(storage: NamespacedStorage) -> dict[tuple[tuple[str, ...], str], bytes]:
    return {
        (path, key): storage.get(path, key) or b"" for path in PATHS for key in KEYS if storage.get(path, key)
    }


def _last_writer(
    history: list[tuple[str, int, int, tuple[str, ...], str]],
) -> dict[tuple[tuple[str, ...], str], bytes]:
    """What the newest change of each key says, by the rules: a delete of the key or of a namespace
    above it wins over a value of the same version."""
    expected = {}
    for path in PATHS:
        for key in KEYS:
            best: tuple[bytes, int, bytes | None] | None = None  # version, delete wins ties, value
            for kind, stamp, node, at, at_key in history:
                version = _version(stamp, node)
                if kind == "set" and (at, at_key) == (path, key):
                    candidate: tuple[bytes, int, bytes | None] = (
                        version,
                        0,
                        b"%d@%d:%s/%s" % (stamp, node, "/".join(at).encode(), at_key.encode()),
                    )
                elif (kind == "delete" and (at, at_key) == (path, key)) or (
                    kind == "delete_all" and path[: len(at)] == at
                ):
                    candidate = (version, 1, None)
                else:
                    continue
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
            if best is not None and best[2] is not None:
                expected[path, key] = best[2]
    return expected


@settings(max_examples=300, deadline=None)
@given(changes, st.randoms(use_true_random=False))
def test_every_order_of_delivery_converges_to_the_last_writer(
    history: list[tuple[str, int, int, tuple[str, ...], str]], random: object
) -> None:
    expected = _last_writer(history)
    orders = [history, list(reversed(history))]
    shuffled = list(history) * 2  # every change delivered twice
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    orders.append(shuffled)
    for order in orders:
        storage = NamespacedStorage(tombstones=Tombstones(10**9, 10**6))
        for change in order:
            _apply(storage, change)
        assert _state(storage) == expected


@settings(max_examples=100, deadline=None)
@given(changes, changes)
def test_two_replicas_that_exchange_everything_end_the_same(
    first: list[tuple[str, int, int, tuple[str, ...], str]],
    second: list[tuple[str, int, int, tuple[str, ...], str]],
) -> None:
    """Merge is commutative and associative: a copy made of merges merges like its changes."""
    a, b = (NamespacedStorage(tombstones=Tombstones(10**9, 10**6)) for _ in range(2))
    for change in first:
        _apply(a, change)
    for change in second:
        _apply(b, change)
    for target, changes_of_other in ((a, second), (b, first)):  # each takes in the other's changes
        for change in changes_of_other:
            _apply(target, change)
    assert _state(a) == _state(b) == _last_writer(first + second)
