"""Scan (storage.scan) driven through NamespacedStorage with a fake clock: the order, the cursor,
and exactly once for the keys stored throughout while a writer changes everything else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestkv.server.errors import InvalidArgument
from nestkv.server.storage import NamespacedStorage
from nestkv.server.storage import scan as scan_module
from nestkv.server.storage.scan import Position, ScanItem, ScanPage, SortedKeys, decode_cursor, encode_cursor
from tests.server.storage.conftest import FakeClock

ROOT = ("tenant", "scan")


def order(path: Sequence[str], key: str) -> tuple[tuple[int, str], ...]:
    """The documented order of an item, as a sort key."""
    return (*((1, segment) for segment in path), (0, key))


@contextlib.contextmanager
def tiny_indexes() -> Iterator[None]:
    """Index every namespace of more than 1 key, in runs of 2 to 4, built 3 keys a step, added
    keys taken in 2 at a time inline, 3 a step beyond, dropped when stale past a floor of 1:
    small stores then take every path (build, added keys, splits, drops) of large ones."""
    with mock.patch.multiple(scan_module, SORT_LIMIT=1, LOAD=2, BUILD_STEP=3, INLINE_ADDS=2, STALE_FLOOR=1):
        yield


def next_page(
    storage: NamespacedStorage,
    cursor: bytes,
    limit: int,
    *,
    recursive: bool = True,
    values: bool = False,
    path: Sequence[str] = ROOT,
) -> ScanPage:
    """The next page, calling again while an index is built (as the server would, between awaits)."""
    for _ in range(10_000):
        page = storage.scan(path, cursor, limit, recursive=recursive, values=values)
        if page is not None:
            return page
    raise AssertionError("an index build never ended")


def scan_all(
    storage: NamespacedStorage, limit: int = 3, *, recursive: bool = True, values: bool = False
) -> list[ScanItem]:
    items: list[ScanItem] = []
    cursor = b""
    while True:
        page = next_page(storage, cursor, limit, recursive=recursive, values=values)
        items += page.items
        if page.done:
            assert page.cursor == b""
            return items
        cursor = page.cursor


# The order.

PATHS = [(), ("a",), ("a", "b"), ("a", "b", "c"), ("ab",), ("a b",), ("é",), ("\U0001f600",), ("z",)]
KEYS = ["", "k", "k0", "k1", "ka", "K", "é", "\uffff", "\U00010000", "z" * 30]


@pytest.mark.parametrize("tiny", [False, True])
def test_a_recursive_scan_lists_every_key_once_in_the_documented_order(
    storage: NamespacedStorage, tiny: bool
) -> None:
    for path in PATHS:
        for key in KEYS:
            storage.set((*ROOT, *path), key, f"{path}/{key}".encode())
    storage.set(("tenant",), "outside", b"x")  # above the scanned namespace: not listed
    storage.set(("tenant", "scanner"), "beside", b"x")
    with tiny_indexes() if tiny else contextlib.nullcontext():
        items = scan_all(storage, limit=4, values=True)
    listed = [(path, key) for path, key, *_ in items]
    expected = sorted(((path, key) for path in PATHS for key in KEYS), key=lambda item: order(*item))
    assert listed == expected
    # Code point order is UTF-8 byte order: the encoded keys of a namespace come out sorted too.
    own = [key.encode() for path, key in listed if path == ()]
    assert own == sorted(own)
    assert all(value == f"{path}/{key}".encode() for path, key, value, *_ in items)


def test_a_flat_scan_lists_only_the_namespace_own_keys(storage: NamespacedStorage) -> None:
    storage.set(ROOT, "b", b"1")
    storage.set(ROOT, "a", b"2")
    storage.set((*ROOT, "child"), "c", b"3")
    items = scan_all(storage, recursive=False)
    assert [(path, key, value) for path, key, value, *_ in items] == [((), "a", None), ((), "b", None)]


def test_a_namespace_that_holds_nothing_gives_one_empty_last_page(storage: NamespacedStorage) -> None:
    assert storage.scan(("nothing",), b"", 10) == ScanPage([], b"", True)


def test_expired_keys_are_not_listed_even_before_they_are_reaped(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    for i in range(10):
        storage.set(ROOT, f"k{i}", b"v", ttl=5 if i % 2 else None)
        storage.set((*ROOT, "child"), f"k{i}", b"v", ttl=5 if i % 2 else None)
    assert len(scan_all(storage)) == 20
    clock.advance(5)
    items = scan_all(storage)
    assert [(path, key) for path, key, *_ in items] == [
        (path, f"k{i}") for path in ((), ("child",)) for i in range(0, 10, 2)
    ]
    assert storage.count(ROOT) == 20  # not reaped by the scan: only not listed


def test_a_page_of_expired_keys_stops_after_a_bounded_look_and_goes_on_from_there(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    for i in range(1000):
        storage.set(ROOT, f"a{i:04d}", b"v", ttl=1)
    storage.set(ROOT, "b", b"v")
    clock.advance(2)
    page = next_page(storage, b"", 1)
    assert page.items == []
    assert not page.done  # it looked at EXAMINE_FACTOR * 1 + 64 expired keys, not at all 1000
    assert decode_cursor(page.cursor, ROOT, True) == Position((), f"a{scan_module.EXAMINE_FACTOR + 63:04d}")
    assert [key for _, key, *_ in scan_all(storage, limit=1)] == ["b"]


# Exactly once while a writer changes everything else.


@st.composite
def writes(draw: st.DrawFn) -> tuple[str, tuple[str, ...], str]:
    kind = draw(st.sampled_from(["insert", "overwrite", "delete", "expiring", "delete_all", "advance"]))
    return kind, draw(st.sampled_from(PATHS)), draw(st.sampled_from(KEYS + [f"n{i}" for i in range(6)]))


items = st.sets(st.tuples(st.sampled_from(PATHS), st.sampled_from(KEYS)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    earlier=items,
    initial=items,
    limit=st.integers(1, 7),
    tiny=st.booleans(),
    lru=st.booleans(),
)
def test_a_key_stored_throughout_is_listed_exactly_once_whatever_changes_between_pages(
    data: st.DataObject,
    earlier: set[tuple[tuple[str, ...], str]],
    initial: set[tuple[tuple[str, ...], str]],
    limit: int,
    tiny: bool,
    lru: bool,
) -> None:
    clock = FakeClock()
    storage = NamespacedStorage(clock, eviction_policy="allkeys-lru" if lru else "noeviction")
    for path, key in earlier:
        storage.set((*ROOT, *path), key, b"earlier")
    # An earlier scan, left where it is: the indexes it made (of `earlier`), or began, serve this
    # one too, with what the hooks told them since.
    with tiny_indexes() if tiny else contextlib.nullcontext():
        cursor = b""
        for _ in range(data.draw(st.integers(1, 12))):
            page = storage.scan(ROOT, cursor, 4, recursive=True)  # None: a build step was done
            if page is not None and page.done:
                break
            cursor = cursor if page is None else page.cursor
    for path, key in initial:
        storage.set((*ROOT, *path), key, b"initial")
    throughout = earlier | initial  # stored from the first page to the last, live all along
    listed: list[tuple[tuple[str, ...], str]] = []
    cursor = b""
    with tiny_indexes() if tiny else contextlib.nullcontext():
        while True:
            page = next_page(storage, cursor, limit)
            for path, key, _, _, deadline in page.items:
                assert deadline > clock.now  # live when listed
                assert storage.get((*ROOT, *path), key) is not None
            listed += [(path, key) for path, key, *_ in page.items]
            if page.done:
                break
            cursor = page.cursor
            for kind, path, key in data.draw(st.lists(writes(), max_size=8)):
                full = (*ROOT, *path)
                if kind in ("insert", "overwrite"):
                    storage.set(full, key, b"written")  # a new key, or a new value: same position
                elif kind == "expiring":
                    storage.set(full, key, b"short", ttl=data.draw(st.sampled_from([0.5, 1, 30])))
                    throughout.discard((path, key))
                elif kind == "delete":  # and maybe written again: it was not there throughout
                    storage.delete(full, key)
                    throughout.discard((path, key))
                elif kind == "delete_all":
                    storage.delete_all(full)
                    throughout -= {(p, k) for p, k in throughout if p[: len(path)] == path}
                else:
                    clock.advance(1)
                    storage.reap()
                if lru:  # reads move keys in the dict's order: no key may move in the scan's
                    storage.get(full, key)
    assert len(listed) == len(set(listed)), "a key listed twice"
    assert throughout <= set(listed), "a key stored throughout was missed"
    assert listed == sorted(listed, key=lambda item: order(*item))


def test_a_key_deleted_and_written_again_mid_scan_keeps_its_place(storage: NamespacedStorage) -> None:
    for key in "abcdef":
        storage.set(ROOT, key, b"v")
    first = next_page(storage, b"", 3)
    assert [key for _, key, *_ in first.items] == ["a", "b", "c"]
    storage.delete(ROOT, "b")  # behind the cursor: not listed again when written back
    storage.set(ROOT, "b", b"again")
    storage.delete(ROOT, "e")  # ahead of it: listed once, with its value at that page
    storage.set(ROOT, "e", b"again")
    storage.set(ROOT, "a0", b"new")  # new, behind: not listed
    storage.set(ROOT, "d0", b"new")  # new, ahead: listed
    rest = next_page(storage, first.cursor, 10, values=True)
    assert [(key, value) for _, key, value, *_ in rest.items] == [
        ("d", b"v"),
        ("d0", b"new"),
        ("e", b"again"),
        ("f", b"v"),
    ]


# Indexes.


def test_a_large_namespace_is_indexed_a_step_at_a_time_and_kept_up_to_date(
    storage: NamespacedStorage,
) -> None:
    with tiny_indexes():
        for i in range(20):
            storage.set(ROOT, f"k{i:02d}", b"v")
        steps = 0
        while (page := storage.scan(ROOT, b"", 5)) is None:
            steps += 1
            assert steps < 1000, "a build that writes outpace never ends"
            storage.set(ROOT, f"during{steps}", b"v")  # told to the build: it is indexed too
        assert steps > 3  # 20 keys, 3 a step
        node = storage._tree.find(ROOT)
        assert node is not None
        assert node.scan is not None
        assert node.scan.entries is not None
        assert node.scan.entries.keys is not None
        written = [f"k{i:02d}" for i in range(20)] + [f"during{i}" for i in range(1, steps + 1)]
        assert [key for _, key, *_ in page.items] == sorted(written)[:5]
        storage.set(ROOT, "after", b"v")  # told to the index
        keys = [key for _, key, *_ in scan_all(storage, recursive=False)]
        assert keys == sorted(keys)
        assert len(keys) == 20 + steps + 1


def test_indexes_go_when_idle_or_dropped_and_come_back_where_the_scan_was(
    storage: NamespacedStorage, clock: FakeClock
) -> None:
    with tiny_indexes():
        for i in range(10):
            storage.set((*ROOT, "child"), f"k{i}", b"v")
            storage.set(ROOT, f"k{i}", b"v")
        first = next_page(storage, b"", 12)
        indexes = storage.scan_indexes
        assert len(indexes.nodes) == 2
        assert indexes.held() == 20
        clock.advance(scan_module.IDLE_SECONDS)
        storage.reap()
        assert indexes.nodes == {}
        assert indexes.held() == 0
        assert storage._tree.find((*ROOT, "child")).scan is None  # type: ignore[union-attr]
        rest = scan_all_from(storage, first.cursor)
        assert [(path, key) for path, key, *_ in first.items + rest] == [
            (path, f"k{i}") for path in ((), ("child",)) for i in range(10)
        ]
        storage.delete_all((*ROOT, "child"))  # its index goes with it at the next reap
        storage.reap()
        assert len(indexes.nodes) == 1


def scan_all_from(storage: NamespacedStorage, cursor: bytes) -> list[ScanItem]:
    items: list[ScanItem] = []
    while True:
        page = next_page(storage, cursor, 3)
        items += page.items
        if page.done:
            return items
        cursor = page.cursor


def test_the_root_emptied_by_delete_all_is_indexed_anew(storage: NamespacedStorage) -> None:
    with tiny_indexes():
        for i in range(10):
            storage.set((), f"old{i}", b"v")
        next_page(storage, b"", 2, path=())
        storage.delete_all(())  # the root gets new dicts: its index is of the old ones
        for i in range(5):
            storage.set((), f"new{i}", b"v")
        page = next_page(storage, b"", 10, path=())
        assert [key for _, key, *_ in page.items] == [f"new{i}" for i in range(5)]


def test_an_index_of_mostly_deleted_keys_is_dropped(storage: NamespacedStorage) -> None:
    with mock.patch.multiple(scan_module, SORT_LIMIT=3, LOAD=2, BUILD_STEP=1000, STALE_FLOOR=4):
        for i in range(20):
            storage.set(ROOT, f"k{i}", b"v")
        next_page(storage, b"", 1)
        for i in range(15):
            storage.delete(ROOT, f"k{i}")
        storage.reap()
        assert storage.scan_indexes.nodes == {}


@given(
    st.lists(st.text(max_size=4), max_size=100),
    st.lists(st.tuples(st.booleans(), st.text(max_size=4)), max_size=200),
)
def test_sorted_keys_holds_a_sorted_set(built: list[str], operations: list[tuple[bool, str]]) -> None:
    with mock.patch.object(scan_module, "LOAD", 2):
        keys = SortedKeys([sorted(set(built))] if built else [])
        model = set(built)
        for add, text in operations:  # adds, and reads from anywhere (which sort and split runs)
            if add:
                keys.add(text)
                model.add(text)
            else:
                assert list(keys.after(text)) == sorted(key for key in model if key > text)
        assert list(keys.after(None)) == sorted(model)
        assert len(keys) == len(model)


# The cursor.


def test_a_cursor_is_opaque_bytes_that_round_trip() -> None:
    position = Position(("é", ""), "\U0001f600")
    cursor = encode_cursor(ROOT, True, position)
    assert isinstance(cursor, bytes)
    assert decode_cursor(cursor, ROOT, True) == position
    assert decode_cursor(b"", ROOT, True) is None


def malformed_cursors() -> dict[str, bytes]:
    good = encode_cursor(ROOT, True, Position(("a",), "k"))
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    return {
        "garbage": b"\x00\x01garbage",
        "one byte": b"x",
        "truncated": good[:-3],
        "a bit flipped": bytes(flipped),
        "trailing byte": good + b"\x00",
        "another namespace": encode_cursor(("tenant", "other"), True, Position(("a",), "k")),
        "not recursive": encode_cursor(ROOT, False, Position((), "k")),
    }


@pytest.mark.parametrize("name", malformed_cursors())
def test_a_malformed_cursor_is_refused_with_a_clear_error(storage: NamespacedStorage, name: str) -> None:
    storage.set(ROOT, "k", b"v")
    with pytest.raises(InvalidArgument, match="cursor is not one this scan gave out") as caught:
        storage.scan(ROOT, malformed_cursors()[name], 10, recursive=True)
    assert caught.value.field == "cursor"


@given(st.binary(max_size=64))
def test_no_random_bytes_pass_for_a_cursor(cursor: bytes) -> None:
    storage = NamespacedStorage(FakeClock())
    storage.set(ROOT, "k", b"v")
    with contextlib.suppress(InvalidArgument):
        page = storage.scan(ROOT, cursor, 10, recursive=True)
        assert cursor == b""
        assert page is not None
        assert page.done


def test_a_page_size_below_one_is_refused(storage: NamespacedStorage) -> None:
    with pytest.raises(InvalidArgument, match="page size 0"):
        storage.scan(ROOT, b"", 0)
