"""NamespacedStorage driven directly, with an injected clock."""

from __future__ import annotations

import contextlib
import re
import sys
import tracemalloc
from collections.abc import Callable
from types import FrameType

import pytest

from nestkv.server.errors import QuotaExceeded, StoreFull
from nestkv.server.storage import NEVER, NamespacedStorage
from nestkv.server.storage.engine import entry_size
from nestkv.server.storage.expiry import LISTING_BYTES, SLOT_OVERHEAD
from nestkv.server.storage.tree import NAMESPACE_OVERHEAD, TRAILER_BYTES, deadline_of, namespace_size
from tests.server.storage.conftest import FakeClock


def test_entry_lives_until_its_deadline_and_not_at_it(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set(("ns",), "key", b"v", ttl=10)
    clock.advance(9.999)
    assert storage.get(("ns",), "key") == b"v"
    assert storage.expires_in(("ns",), "key") == pytest.approx(0.001)
    clock.advance(0.001)
    assert storage.get(("ns",), "key") is None
    assert storage.exists(("ns",), "key") is False
    assert storage.expires_in(("ns",), "key") is None


def test_expires_in_tells_missing_never_and_left(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set((), "forever", b"v")
    storage.set((), "ttl", b"v", ttl=5)
    clock.advance(2)
    assert storage.expires_in((), "missing") is None
    assert storage.expires_in((), "forever") == NEVER
    assert storage.expires_in((), "ttl") == pytest.approx(3)


def test_renew_moves_the_deadline_from_now(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set((), "key", b"v", ttl=1)
    clock.advance(0.5)
    assert storage.get((), "key", renew_for=10) == b"v"
    assert storage.expires_in((), "key") == pytest.approx(10)
    clock.advance(5)
    assert storage.reap() == 1  # the stale item of the first deadline
    assert storage.get((), "key") == b"v"


def test_renew_leaves_entries_without_deadline_alone(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set((), "key", b"v")
    storage.get((), "key", renew_for=1)
    clock.advance(100)
    assert storage.expires_in((), "key") == NEVER
    assert storage.index_size() == 0


def test_reap_reclaims_expired_entries_nobody_reads(storage: NamespacedStorage, clock: FakeClock) -> None:
    for i in range(1000):
        storage.set(("sessions", str(i % 7)), f"k{i}", b"v", ttl=1 + i % 3)
    storage.set(("kept",), "key", b"v")
    storage.set(("kept",), "later", b"v", ttl=100)
    clock.advance(3)
    assert storage.count() == 1002  # expired but not yet reclaimed
    assert storage.reap() == 1000
    assert storage.count() == 2
    assert storage.count(("sessions",)) == 0
    assert storage.index_size() == 1
    assert storage.get(("kept",), "key") == b"v"


def test_reap_looks_at_most_at_limit_items(storage: NamespacedStorage, clock: FakeClock) -> None:
    for i in range(25):
        storage.set((), f"k{i}", b"v", ttl=1)
    clock.advance(1)
    assert storage.reap(limit=10) == 10
    assert storage.count() == 15
    assert storage.reap(limit=100) == 15
    assert storage.count() == 0


def test_reap_keeps_an_entry_overwritten_without_expiry(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set((), "key", b"old", ttl=1)
    storage.set((), "key", b"new")
    clock.advance(2)
    storage.reap()
    assert storage.get((), "key") == b"new"


def test_reap_never_touches_a_namespace_recreated_after_delete_all(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    storage.set(("a", "b"), "key", b"old", ttl=1)
    storage.delete_all(("a",))
    storage.set(("a", "b"), "key", b"new", ttl=10)
    clock.advance(2)
    storage.reap()
    assert storage.get(("a", "b"), "key") == b"new"


def test_renewals_and_overwrites_keep_the_index_bounded(storage: NamespacedStorage, clock: FakeClock) -> None:
    # Each moves its key to another slot, listed there at once (so that only writes, which make
    # room first, ever add listings); the stale ones are dropped when they outnumber the live.
    storage.set((), "session", b"v", ttl=3600)
    storage.set((), "counter", b"0", ttl=60)
    for i in range(10_000):
        storage.get((), "session", renew_for=3600)
        storage.set((), "counter", str(i).encode(), ttl=60)
        clock.advance(0.01)
        assert storage.index_size() <= 2 * 2 + 64 + 1
    assert storage.used_memory == accounted(storage)


@pytest.mark.parametrize("push_out", ["renew", "overwrite"])
def test_entry_pushed_out_expires_at_its_new_deadline_unread(
    storage: NamespacedStorage, clock: FakeClock, push_out: str
) -> None:
    storage.set((), "key", b"old", ttl=1)
    if push_out == "renew":
        storage.get((), "key", renew_for=5)
    else:
        storage.set((), "key", b"new", ttl=5)
    clock.advance(2)
    storage.reap()  # the first item comes due: the entry is rescheduled, not dropped
    assert storage.count() == 1
    assert storage.index_size() == 1
    assert storage.get((), "key") == (b"old" if push_out == "renew" else b"new")
    clock.advance(3)
    storage.reap()
    assert storage.count() == 0
    assert storage.index_size() == 0


def test_shortened_deadline_is_reaped_unread(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set((), "renewed", b"v", ttl=100)
    storage.get((), "renewed", renew_for=1)
    storage.set((), "overwritten", b"v", ttl=100)
    storage.set((), "overwritten", b"v", ttl=1)
    clock.advance(1)
    storage.reap()
    assert storage.count() == 0


def test_index_stays_bounded_under_deletes(storage: NamespacedStorage, clock: FakeClock) -> None:
    for i in range(100_000):
        storage.set((), f"k{i}", b"v", ttl=3600)
        storage.delete((), f"k{i}")
    # Stale items are dropped whenever the heap doubles: never more than 2x live + the floor.
    assert storage.index_size() <= 1024


def test_index_drops_items_of_dropped_namespaces(storage: NamespacedStorage, clock: FakeClock) -> None:
    for i in range(5000):
        storage.set(("gone",), f"k{i}", b"v", ttl=3600)
    storage.delete_all(("gone",))
    storage.set(("live",), "key", b"v", ttl=3600)
    for i in range(5000):
        storage.set(("live",), f"x{i}", b"v", ttl=3600)
    assert storage.index_size() < 10_000
    assert storage.count() == 5001


def test_delete_all_drops_only_the_subtree(storage: NamespacedStorage) -> None:
    for path in [(), ("a",), ("a", "b"), ("a", "b", "c"), ("a", "bb"), ("ab",)]:
        storage.set(path, "key", b"v")
    storage.delete_all(("a", "b"))
    assert storage.count(("a", "b")) == 0
    assert storage.count() == 4
    assert storage.get(("a",), "key") == b"v"
    assert storage.get(("a", "bb"), "key") == b"v"


def test_delete_all_of_root_empties_everything(storage: NamespacedStorage) -> None:
    storage.set((), "key", b"v")
    storage.set(("a",), "key", b"v", ttl=5)
    storage.delete_all(())
    assert storage.count() == 0


def test_empty_namespaces_are_pruned(storage: NamespacedStorage, clock: FakeClock) -> None:
    storage.set(("a", "b", "c"), "key", b"v")
    storage.set(("a", "x"), "key", b"v", ttl=1)
    storage.delete(("a", "b", "c"), "key")
    assert storage._tree.find(("a", "b")) is None
    clock.advance(1)
    assert storage.exists(("a", "x"), "key") is False
    assert storage._tree.root.children == {}


def test_delete_missing_key_or_namespace_is_a_noop(storage: NamespacedStorage) -> None:
    storage.set(("a",), "key", b"v")
    storage.delete(("a",), "missing")
    storage.delete(("nope",), "key")
    assert storage.count() == 1


def calls_made(action: Callable[[], object]) -> int:
    """How many Python and C function calls `action` makes: a measure of work immune to machine noise."""
    count = 0

    def profiler(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profiler)
    try:
        action()
    finally:
        sys.setprofile(None)
    return count


def delete_all_work(target_keys: int, other_keys: int) -> int:
    storage = NamespacedStorage(FakeClock())
    for i in range(target_keys):
        storage.set(("tenant", "target", str(i % 10)), f"k{i}", b"v", ttl=60 if i % 2 else None)
    for i in range(other_keys):
        storage.set(("tenant", f"other{i % 100}"), f"k{i}", b"v", ttl=60 if i % 2 else None)
    return calls_made(lambda: storage.delete_all(("tenant", "target")))


def test_delete_all_work_does_not_depend_on_the_number_of_keys() -> None:
    baseline = delete_all_work(target_keys=10, other_keys=10)
    assert delete_all_work(target_keys=10, other_keys=200_000) == baseline
    assert delete_all_work(target_keys=100_000, other_keys=10) == baseline


def test_dropped_namespace_is_freed_in_bounded_steps_without_touching_its_successor(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    for i in range(25_000):
        storage.set(("tenant", str(i % 3)), f"k{i}", b"old", ttl=60 if i % 2 else None)
    storage.delete_all(("tenant",))
    storage.set(("tenant", "0"), "k0", b"new", ttl=60)
    assert storage.count() == 1  # gone for every operation at once
    steps = [storage.reap(limit=10_000) for _ in range(5)]
    assert steps[:2] == [10_000, 10_000]  # freeing is chunked: the loop gets control back
    assert steps[-1] < 10_000  # and it finishes
    assert storage.get(("tenant", "0"), "k0") == b"new"
    clock.advance(61)
    assert storage.reap() == 1
    assert storage.count() == 0


def test_shortened_deadlines_keep_the_wheel_bounded(storage: NamespacedStorage, clock: FakeClock) -> None:
    for i in range(10_000):
        storage.set((), "key", b"v", ttl=3600 - i * 0.3)  # each overwrite lists the key again, earlier
    assert storage.index_size() <= 2 * 1 + 64
    clock.advance(3600)
    storage.reap()
    assert storage.count() == 0
    assert storage.index_size() == 0


def bounded(clock: FakeClock, policy: str, entries: int = 10, slots: int = 0) -> NamespacedStorage:
    """Storage with room for about `entries` entries of a 1-byte key and a 100-byte value in the
    root namespace, `slots` of whose deadlines fall in distinct slots of the expiry wheel."""
    room = entries * entry_size("k", b"v" * (100 + TRAILER_BYTES)) + slots * (SLOT_OVERHEAD + LISTING_BYTES)
    return NamespacedStorage(clock, max_memory=room, eviction_policy=policy)  # type: ignore[arg-type]


def test_noeviction_refuses_writes_over_the_bound_and_keeps_serving(clock: FakeClock) -> None:
    storage = bounded(clock, "noeviction")
    for i in range(10):
        storage.set((), str(i), b"v" * 100)
    with pytest.raises(StoreFull, match=r"would exceed max_memory \d+ B, and eviction policy noeviction"):
        storage.set((), "x", b"v" * 100)
    assert storage.count() == 10
    assert storage.get((), "3") == b"v" * 100  # reads still work
    storage.set((), "3", b"w" * 100)  # so does an overwrite of the same size
    storage.delete((), "3")
    storage.set((), "x", b"v" * 100)  # room again
    with pytest.raises(StoreFull, match="this write needs"):
        storage.set((), "huge", b"v" * 10_000)


def test_allkeys_lru_evicts_the_least_recently_used(clock: FakeClock) -> None:
    storage = bounded(clock, "allkeys-lru")
    for i in range(10):
        storage.set((), str(i), b"v" * 100)
    storage.get((), "0")  # used: now the most recent
    storage.set((), "a", b"v" * 100)
    storage.set((), "b", b"v" * 100)
    assert storage.get((), "1") is None
    assert storage.get((), "2") is None
    assert storage.get((), "0") == b"v" * 100
    assert storage.count() == 10


def test_volatile_lru_evicts_only_keys_with_a_deadline(clock: FakeClock) -> None:
    storage = bounded(clock, "volatile-lru", entries=11, slots=1)  # room for 10 with these longer keys
    for i in range(5):
        storage.set((), f"plain{i}", b"v" * 100)
    for i in range(5):
        storage.set((), f"ttl{i}", b"v" * 100, ttl=100)
    for i in range(5):
        storage.set((), f"new{i}", b"v" * 100)
    assert all(storage.exists((), f"plain{i}") for i in range(5))
    assert not any(storage.exists((), f"ttl{i}") for i in range(5))
    with pytest.raises(StoreFull, match="volatile-lru frees nothing"):
        storage.set((), "one-more", b"v" * 100)


def test_volatile_ttl_evicts_the_nearest_deadline_first(clock: FakeClock) -> None:
    storage = bounded(clock, "volatile-ttl", entries=11, slots=9)  # room for 10 with these longer keys
    storage.set((), "plain", b"v" * 100)
    for i in range(9):
        storage.set((), f"ttl{i}", b"v" * 100, ttl=100 - i * 10)  # ttl8 expires first
    written = 0
    while sum(storage.exists((), f"ttl{i}") for i in range(9)) > 7:  # until two have gone
        storage.set((), f"new{written}", b"v" * 100)
        written += 1
    assert not storage.exists((), "ttl8")
    assert not storage.exists((), "ttl7")
    assert all(storage.exists((), f"ttl{i}") for i in range(7))
    assert storage.exists((), "plain")
    assert all(storage.exists((), f"new{n}") for n in range(written))


def test_used_memory_comes_back_to_zero(clock: FakeClock) -> None:
    storage = bounded(clock, "allkeys-lru", entries=1000)
    for i in range(500):
        storage.set(("a", str(i % 3)), f"k{i}", b"v" * 100, ttl=10 if i % 2 else None)
    storage.set(("b",), "k", b"v")
    assert storage.used_memory > 0
    storage.delete_all(("a",))
    clock.advance(11)
    storage.reap()
    storage.delete(("b",), "k")
    assert storage.used_memory == 0


def test_volatile_ttl_goes_by_the_deadline_a_renewal_gave(clock: FakeClock) -> None:
    storage = bounded(clock, "volatile-ttl", entries=2, slots=3)  # and a list for the renewal
    storage.set((), "a", b"v" * 100, ttl=10)
    storage.set((), "b", b"v" * 100, ttl=20)
    assert storage.get((), "a", renew_for=10_000) == b"v" * 100  # a is listed at +10 s still
    storage.set((), "c", b"v" * 100, ttl=30)  # over the bound: the nearest deadline (b) goes
    assert storage.exists((), "a")
    assert not storage.exists((), "b")
    assert storage.exists((), "c")


def test_volatile_ttl_keeps_the_key_it_is_writing_listed_for_expiry(clock: FakeClock) -> None:
    storage = bounded(clock, "volatile-ttl", entries=3, slots=3)
    storage.set((), "k", b"v" * 100, ttl=5)  # the nearest deadline...
    storage.set((), "x", b"v" * 100, ttl=50)
    storage.set((), "y", b"v" * 100, ttl=60)
    storage.set((), "k", b"w" * 150, ttl=10)  # ...rewritten larger: eviction passes over it, takes x
    assert not storage.exists((), "x")
    clock.advance(11)
    storage.reap()
    assert storage.count() == 1  # k was reaped at its deadline, with nobody reading it
    assert storage.exists((), "y")


def test_delete_all_gives_its_bytes_back_at_once_and_no_write_frees_them(clock: FakeClock) -> None:
    storage = bounded(clock, "noeviction", entries=20_000)
    for i in range(19_000):
        storage.set(("old", str(i % 7)), f"k{i}", b"v" * 100, ttl=100 if i % 2 else None)
    storage.set(("kept",), "k", b"v" * 100)
    storage.delete_all(("old",))
    kept = entry_size("k", b"v" * (100 + TRAILER_BYTES)) + namespace_size("kept")
    assert storage.used_memory == kept  # in O(depth): nothing freed yet
    for i in range(19_000):  # a full store's worth of writes, right after
        storage.set(("new",), f"k{i}", b"v" * 100)
    # The dropped entries were left to the reaper: freeing them is its work, not the writes'.
    assert storage.reap(limit=1_000_000) > 19_000
    new = sum(entry_size(f"k{i}", b"v" * (100 + TRAILER_BYTES)) for i in range(19_000)) + namespace_size(
        "new"
    )
    assert storage.used_memory == new + kept == accounted(storage)


@pytest.mark.parametrize("policy", [None, "allkeys-lru", "volatile-lru", "volatile-ttl"])
def test_subtree_totals_match_the_entries_after_any_history(clock: FakeClock, policy: str | None) -> None:
    # Bounded at about 60 entries of the 250 keys written: evictions run all along.
    storage = NamespacedStorage(clock) if policy is None else bounded(clock, policy, entries=60)
    random = __import__("random").Random(7)
    paths = [(), ("a",), ("a", "b"), ("a", "b", "c"), ("d",)]
    for step in range(5_000):
        path, key = random.choice(paths), f"k{random.randrange(50)}"
        roll = random.random()
        if roll < 0.6:
            with contextlib.suppress(StoreFull):  # volatile-lru may find nothing to evict
                storage.set(path, key, b"v" * random.randrange(200), ttl=random.choice([None, 0.5, 5]))
        elif roll < 0.8:
            storage.delete(path, key)
        elif roll < 0.82:
            storage.delete_all(random.choice(paths))
        else:
            storage.get(path, key, renew_for=random.choice([None, 1.0]))
        if step % 100 == 0:
            clock.advance(0.3)
            storage.reap()
    for path in paths:
        below = [
            (key, stored) for _, node in storage._tree.walk(path) for key, stored in node.entries.items()
        ]
        expected = (
            len(below),
            accounted(storage, path),
            sum(deadline_of(stored) != NEVER for _, stored in below),
        )
        assert storage.subtree(path)[:3] == expected


def accounted(storage: NamespacedStorage, path: tuple[str, ...] = ()) -> int:
    """The bytes the namespace at `path` should be accounted, recounted from what it holds."""
    total = 0
    for here, node in storage._tree.walk(path):
        total += sum(entry_size(key, stored) for key, stored in node.entries.items())
        total += len(node.slots) * SLOT_OVERHEAD + node.scheduled * LISTING_BYTES
        total += namespace_size(here[-1]) if here else 0
    return total


@pytest.mark.parametrize(
    ("key_bytes", "value_bytes", "ttl"), [(8, 1, None), (8, 1, 10), (21, 100, 3600), (16, 1024, None)]
)
def test_used_memory_follows_what_the_entries_really_allocate(
    key_bytes: int, value_bytes: int, ttl: float | None
) -> None:
    # What --max-memory bounds must be what the entries take, small ones included: the
    # per-entry overhead (dict slot, object headers, wheel listing) dominates a tiny entry.
    storage = NamespacedStorage()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            storage.set(("ns",), f"k{i:0{key_bytes - 1}d}", b"v" * value_bytes, ttl=ttl)
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 < allocated / storage.used_memory < 1.25


def allocated_by(writes: Callable[[NamespacedStorage], None]) -> tuple[int, NamespacedStorage]:
    storage = NamespacedStorage()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        writes(storage)
        return tracemalloc.get_traced_memory()[0] - before, storage
    finally:
        tracemalloc.stop()


# What a tenant may choose to make each key cost, beyond its key and value (empty here):
# (count, the path of key i).
NAMESPACE_SHAPES: dict[str, tuple[int, Callable[[int], tuple[str, ...]]]] = {
    "one-namespace-per-key": (30_000, lambda i: (f"n{i:07d}",)),
    "32-deep-chain-per-key": (1_000, lambda i: (f"c{i:07d}", *("s",) * 31)),
    "256-byte-names": (20_000, lambda i: (f"{i:0256d}",)),
    "non-ascii-names": (10_000, lambda i: (f"{i:07d}" + "\U0001f600" * 60,)),
}


@pytest.mark.parametrize("shape", NAMESPACE_SHAPES)
def test_used_memory_follows_what_namespaces_really_allocate(shape: str) -> None:
    # Uncounted, a namespace per key made a key cost 95 times what --max-memory counted.
    count, path_of = NAMESPACE_SHAPES[shape]

    def writes(storage: NamespacedStorage) -> None:
        for i in range(count):
            storage.set(path_of(i), "k", b"")

    allocated, storage = allocated_by(writes)
    assert 0.75 < allocated / storage.used_memory < 1.25
    assert storage.used_memory == accounted(storage)


def test_expiry_bookkeeping_is_counted_and_never_undercounted() -> None:
    # Each key in a slot of its own, in a namespace of its own: a list and a heap entry each.
    def distinct_deadlines(storage: NamespacedStorage) -> None:
        for i in range(20_000):
            storage.set((f"n{i:07d}",), "k", b"", ttl=1000 + i * 0.1)

    allocated, storage = allocated_by(distinct_deadlines)
    assert 0.6 < allocated / storage.used_memory < 1.1  # counted with the share stale entries may keep

    # Written and deleted at once: namespaces pruned, their lists stale in the heap until compacted.
    def written_and_deleted(storage: NamespacedStorage) -> None:
        for i in range(50_000):
            storage.set((f"n{i:07d}",), "k", b"", ttl=1_000_000 + i * 0.1)
            storage.delete((f"n{i:07d}",), "k")

    allocated, storage = allocated_by(written_and_deleted)
    assert storage.used_memory == 0
    assert allocated < 1024 * 1024  # a floor of stale heap entries, not one a write


def test_namespaces_give_their_bytes_back_when_they_empty(clock: FakeClock) -> None:
    storage = NamespacedStorage(clock)
    storage.set(("a", "b", "c"), "k", b"v", ttl=5)
    storage.set(("a", "d"), "k", b"v")
    assert storage.used_memory == accounted(storage) > 4 * NAMESPACE_OVERHEAD
    storage.delete(("a", "d"), "k")
    assert storage.used_memory == accounted(storage)
    clock.advance(6)
    storage.reap()
    assert storage.used_memory == 0
    assert storage._tree.root.children == {}


def test_a_write_that_would_create_namespaces_over_the_bound_is_refused(clock: FakeClock) -> None:
    storage = NamespacedStorage(clock, max_memory=10 * NAMESPACE_OVERHEAD)
    with pytest.raises(StoreFull, match="this write needs"):
        storage.set(tuple(f"s{d}" for d in range(32)), "k", b"")
    assert storage.used_memory == 0
    deep = tuple(f"s{d}" for d in range(8))
    storage.set(deep, "k", b"")
    with pytest.raises(StoreFull, match="would exceed max_memory"):
        storage.set(("other", *deep), "k", b"")
    assert storage.used_memory == accounted(storage) <= storage.max_memory


def fill_until_refused(storage: NamespacedStorage, path: tuple[str, ...]) -> tuple[int, QuotaExceeded]:
    """Write 100-byte values at `path` until a quota refuses one: how many went in, and the refusal."""
    for written in range(1_000):
        try:
            storage.set(path, f"k{written}", b"v" * 100)
        except QuotaExceeded as refusal:
            return written, refusal
    raise AssertionError("no quota refused a write")


def test_a_quota_bounds_its_namespace_and_only_it(clock: FakeClock) -> None:
    storage = NamespacedStorage(clock)
    storage.quotas = {("t",): 20 * 1024, ("t", "small"): 4 * 1024}
    written, refusal = fill_until_refused(storage, ("t", "a"))
    assert re.match(r"namespace \['t'\] holds \d+ B .* over its quota of 20480 B", str(refusal))
    assert 20 * 1024 - 400 < storage.subtree(("t",)).bytes <= 20 * 1024
    assert storage.count(("t",)) == written  # the refused write changed nothing
    storage.set(("t", "a"), "k0", b"w" * 100)  # an overwrite of the same size still fits
    with pytest.raises(QuotaExceeded, match=r"\['t'\]"):
        storage.set(("t", "b"), "new", b"")  # nor may a new namespace under it
    storage.set(("other",), "k", b"v" * 100_000)  # other namespaces are not bound by it
    storage.delete_all(("t", "a"))
    _, refusal = fill_until_refused(storage, ("t", "small", "x"))
    assert re.match(r"namespace \['t', 'small'\] .* quota of 4096 B", str(refusal))
    assert storage.subtree(("t", "small")).bytes <= 4 * 1024
    small = storage.subtree(("t", "small")).bytes
    assert storage.quota_at(("t", "small", "x")) == (("t", "small"), 4 * 1024, small)
    assert storage.quota_at(("t", "a")) == (("t",), 20 * 1024, storage.subtree(("t",)).bytes)
    assert storage.quota_at(("other",)) is None


def test_no_path_takes_the_store_past_a_quota_or_the_bound(clock: FakeClock) -> None:
    # Found by review: overwrites that moved deadlines were listed later by the reaper, renewals
    # that pulled deadlines in listed at once, neither checked against the bounds.
    for bounds in ({"quotas": {("q",): 50_000}}, {"max_memory": 50_000}):
        storage = NamespacedStorage(clock, max_memory=bounds.get("max_memory", 0))  # type: ignore[arg-type]
        storage.quotas = bounds.get("quotas", {})  # type: ignore[assignment]
        limit = 50_000
        with contextlib.suppress(QuotaExceeded, StoreFull):
            for i in range(200):
                storage.set(("q",), f"k{i}", b"v", ttl=1)
        with contextlib.suppress(QuotaExceeded, StoreFull):
            for i in range(200):
                storage.set(("q",), f"k{i}", b"v", ttl=2 + i * 0.1)  # each to a slot of its own
        assert storage.used_memory <= limit
        clock.advance(1.5)
        storage.reap()
        assert storage.used_memory == accounted(storage) <= limit
        storage.set(("q",), "renewed", b"v", ttl=3600)
        for i in range(60):  # each renewal pulls the deadline into an earlier slot
            with contextlib.suppress(QuotaExceeded, StoreFull):
                storage.get(("q",), "renewed", renew_for=3000 - i * 10)
            assert storage.used_memory == accounted(storage) <= limit
        storage.delete_all()
