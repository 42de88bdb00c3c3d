"""The Store contract, run against every store (see the `store` fixture in conftest.py).

Each test states one line of the contract; a store that breaks the line fails it.
Expiry is exercised with real sub-second TTLs, never multi-second sleeps.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import litestar.stores.base as litestar_base
import pytest

from nestkv.client import NamespacedStore, Store

# Wide enough that a loaded CI machine cannot run a test's first steps past SHORT.
SHORT = 0.25  # seconds: a TTL the tests wait out
WAIT = 0.5  # seconds: comfortably past SHORT


async def test_is_a_namespaced_store_also_for_litestar(store: NamespacedStore) -> None:
    assert isinstance(store, Store)
    assert isinstance(store, NamespacedStore)
    assert isinstance(store, litestar_base.Store)
    assert isinstance(store, litestar_base.NamespacedStore)
    assert isinstance(store.with_namespace("x"), litestar_base.NamespacedStore)


async def test_set_then_get_bytes(store: NamespacedStore) -> None:
    await store.set("key", b"\x00\xffvalue")
    assert await store.get("key") == b"\x00\xffvalue"


async def test_str_is_stored_as_utf8(store: NamespacedStore) -> None:
    await store.set("key", "zürich ✓")
    assert await store.get("key") == "zürich ✓".encode()


async def test_get_missing_is_none(store: NamespacedStore) -> None:
    assert await store.get("missing") is None


async def test_empty_value_is_a_value(store: NamespacedStore) -> None:
    await store.set("empty", b"")
    assert await store.get("empty") == b""
    assert await store.exists("empty") is True


async def test_set_replaces_value_and_expiry(store: NamespacedStore) -> None:
    await store.set("key", b"one", expires_in=100)
    await store.set("key", b"two")
    assert await store.get("key") == b"two"
    assert await store.expires_in("key") == -1


@pytest.mark.parametrize(
    "key", ["", " ", "ключ", "🔑", "a\x00b", "a:b", "a*", "*", "line\nbreak", "a/b", "é" * 100]
)
async def test_special_and_unicode_keys(store: NamespacedStore, key: str) -> None:
    await store.set(key, key.encode())
    assert await store.get(key) == key.encode()
    assert await store.exists(key) is True
    await store.delete(key)
    assert await store.exists(key) is False


async def test_value_of_10_mib(store: NamespacedStore) -> None:
    value = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    await store.set("big", value)
    assert await store.get("big") == value


async def test_value_at_the_default_limit_of_16_mib(store: NamespacedStore) -> None:
    # Over grpcio's default message size of 4 MiB: client and server raise theirs to fit.
    value = b"v" * (16 * 1024 * 1024)
    await store.set("k" * 4096, value)
    assert await store.get("k" * 4096) == value


async def test_500_concurrent_operations(store: NamespacedStore) -> None:
    ns = store.with_namespace("concurrent")
    await asyncio.gather(*(ns.set(f"k{i}", str(i)) for i in range(500)))
    values = await asyncio.gather(*(ns.get(f"k{i}") for i in range(500)))
    assert values == [str(i).encode() for i in range(500)]


# -- expiry -----------------------------------------------------------------


async def test_no_expiry_reports_minus_one(store: NamespacedStore) -> None:
    await store.set("key", b"v")
    assert await store.expires_in("key") == -1


async def test_expires_in_missing_is_none(store: NamespacedStore) -> None:
    assert await store.expires_in("missing") is None


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (100, 100),
        (timedelta(seconds=100), 100),
        (timedelta(days=1, seconds=5), 86_405),  # .seconds would give 5
        (timedelta(days=30), 2_592_000),
        (timedelta(seconds=2, milliseconds=400), 2),  # rounded to the nearest second
        (timedelta(seconds=2, milliseconds=900), 3),
    ],
)
async def test_expires_in_is_whole_seconds_left(
    store: NamespacedStore, expires_in: int | timedelta, expected: int
) -> None:
    await store.set("key", b"v", expires_in=expires_in)
    assert await store.expires_in("key") == expected


async def test_key_is_gone_at_its_deadline_for_every_operation(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=timedelta(seconds=SHORT))
    assert await store.get("key") == b"v"
    await asyncio.sleep(WAIT)
    assert await store.exists("key") is False
    assert await store.expires_in("key") is None
    assert await store.get("key") is None
    assert await store.get("key", renew_for=100) is None


async def test_exists_is_false_for_expired_key_never_read(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=timedelta(seconds=SHORT))
    await asyncio.sleep(WAIT)
    assert await store.exists("key") is False


async def test_float_seconds_give_subsecond_expiry(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=SHORT)  # type: ignore[arg-type]
    await asyncio.sleep(WAIT)
    assert await store.get("key") is None


async def test_renew_extends_expiry(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=timedelta(seconds=SHORT))
    assert await store.get("key", renew_for=100) == b"v"
    await asyncio.sleep(WAIT)
    assert await store.get("key") == b"v"
    assert await store.expires_in("key") in (99, 100)  # 100 s from the renewal, WAIT ago


async def test_renew_accepts_a_timedelta_of_days(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=10)
    await store.get("key", renew_for=timedelta(days=2, seconds=1))
    assert await store.expires_in("key") == 172_801


async def test_renew_can_shorten_to_subsecond(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=100)
    assert await store.get("key", renew_for=timedelta(seconds=SHORT)) == b"v"
    await asyncio.sleep(WAIT)
    assert await store.get("key") is None


async def test_renew_leaves_key_without_expiry_without(store: NamespacedStore) -> None:
    await store.set("key", b"v")
    assert await store.get("key", renew_for=timedelta(seconds=SHORT)) == b"v"
    assert await store.expires_in("key") == -1
    await asyncio.sleep(WAIT)
    assert await store.get("key") == b"v"


async def test_get_without_renew_keeps_expiry(store: NamespacedStore) -> None:
    await store.set("key", b"v", expires_in=timedelta(seconds=SHORT))
    assert await store.get("key") == b"v"
    await asyncio.sleep(WAIT)
    assert await store.get("key") is None


@pytest.mark.parametrize("span", [-1, 0, -0.5, timedelta(seconds=-1), timedelta(0), float("nan")])
async def test_non_positive_expires_in_is_rejected_and_changes_nothing(
    store: NamespacedStore, span: int | timedelta
) -> None:
    await store.set("key", b"old", expires_in=100)
    with pytest.raises(ValueError, match="expires_in must be positive"):
        await store.set("key", b"new", expires_in=span)
    assert await store.get("key") == b"old"
    assert await store.expires_in("key") == 100


@pytest.mark.parametrize("span", [-1, 0, timedelta(seconds=-5), timedelta(0)])
async def test_non_positive_renew_for_is_rejected_and_changes_nothing(
    store: NamespacedStore, span: int | timedelta
) -> None:
    await store.set("key", b"v", expires_in=100)
    with pytest.raises(ValueError, match="renew_for must be positive"):
        await store.get("key", renew_for=span)
    assert await store.expires_in("key") == 100


async def test_span_beyond_duration_range_is_rejected(store: NamespacedStore) -> None:
    with pytest.raises(ValueError, match="the limit is 315576000000 s"):
        await store.set("key", b"v", expires_in=timedelta(days=999_999_999))
    assert await store.exists("key") is False


@pytest.mark.parametrize("span", [True, "10", 1j])
async def test_span_of_wrong_type_is_a_type_error(store: NamespacedStore, span: object) -> None:
    with pytest.raises(TypeError, match="expires_in must be seconds"):
        await store.set("key", b"v", expires_in=span)  # type: ignore[arg-type]


# -- delete ------------------------------------------------------------------


async def test_delete_removes_key(store: NamespacedStore) -> None:
    await store.set("key", b"v")
    await store.delete("key")
    assert await store.get("key") is None
    assert await store.exists("key") is False


async def test_delete_missing_is_a_noop(store: NamespacedStore) -> None:
    await store.set("other", b"v")
    await store.delete("missing")
    assert await store.get("other") == b"v"


# -- namespaces --------------------------------------------------------------


async def test_namespaces_isolate_the_same_key(store: NamespacedStore) -> None:
    child = store.with_namespace("child")
    grandchild = child.with_namespace("grandchild")
    await store.set("key", b"root")
    await child.set("key", b"child")
    await grandchild.set("key", b"grandchild")
    assert [await s.get("key") for s in (store, child, grandchild)] == [b"root", b"child", b"grandchild"]
    await child.delete("key")
    assert [await s.get("key") for s in (store, child, grandchild)] == [b"root", None, b"grandchild"]


@pytest.mark.parametrize(
    ("path", "look_alike"),
    [
        (("a",), ("ab",)),
        (("a", "b"), ("a_b",)),
        (("a", "b"), ("ab",)),
        (("a", "b"), ("a:b",)),
        (("a", "b"), ("a/b",)),
        (("a", "b"), ("a.b",)),
        (("a:b",), ("a", "b")),
        (("a", "a"), ("a",)),
    ],
)
async def test_look_alike_namespaces_never_collide(
    store: NamespacedStore, path: tuple[str, ...], look_alike: tuple[str, ...]
) -> None:
    first, second = store, store
    for segment in path:
        first = first.with_namespace(segment)
    for segment in look_alike:
        second = second.with_namespace(segment)
    await first.set("key", b"first")
    await second.set("key", b"second")
    await first.set("b:key", b"first-prefixed")
    assert await first.get("key") == b"first"
    assert await second.get("key") == b"second"
    assert await second.get("b:key") is None
    await first.delete_all()
    assert await first.get("key") is None
    assert await second.get("key") == b"second"


async def test_delete_all_on_root_empties_everything(store: NamespacedStore) -> None:
    await store.set("top", b"v")
    await store.with_namespace("a").set("k", b"v")
    await store.with_namespace("a").with_namespace("b").set("k", b"v", expires_in=100)
    await store.delete_all()
    assert await store.get("top") is None
    assert await store.with_namespace("a").get("k") is None
    assert await store.with_namespace("a").with_namespace("b").get("k") is None


async def test_delete_all_goes_down_not_up_or_sideways(store: NamespacedStore) -> None:
    parent = store.with_namespace("parent")
    target = parent.with_namespace("target")
    below = target.with_namespace("below")
    sibling = parent.with_namespace("sibling")
    look_alike = parent.with_namespace("target2")
    for s in (store, parent, target, below, sibling, look_alike):
        await s.set("key", b"v")
        await s.set("ttl", b"v", expires_in=100)
    await target.delete_all()
    assert await target.get("key") is None
    assert await target.get("ttl") is None
    assert await below.get("key") is None
    for s in (store, parent, sibling, look_alike):
        assert await s.get("key") == b"v"
        assert await s.expires_in("ttl") == 100
    # The namespace is usable again afterwards.
    await target.set("key", b"again")
    assert await target.get("key") == b"again"


async def test_delete_all_of_empty_namespace_is_a_noop(store: NamespacedStore) -> None:
    await store.set("key", b"v")
    await store.with_namespace("nothing").with_namespace("here").delete_all()
    assert await store.get("key") == b"v"


@pytest.mark.parametrize("namespace", ["", "x" * 257, "é" * 129])
async def test_bad_namespace_segment_is_rejected(store: NamespacedStore, namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        store.with_namespace(namespace)


async def test_longest_namespace_segment_is_accepted(store: NamespacedStore) -> None:
    child = store.with_namespace("é" * 128)
    await child.set("key", b"v")
    assert await child.get("key") == b"v"


async def test_namespace_must_be_a_str(store: NamespacedStore) -> None:
    with pytest.raises(TypeError, match="namespace must be a str"):
        store.with_namespace(b"bytes")  # type: ignore[arg-type]


# -- limits and types --------------------------------------------------------


async def test_oversized_key_is_rejected_and_nothing_stored(store: NamespacedStore) -> None:
    key = "k" * 4097
    with pytest.raises(ValueError, match=r"key is 4097 bytes; the limit is 4096 \(max_key_bytes\)"):
        await store.set(key, b"v")
    await store.set("k" * 4096, b"v")  # the limit itself is fine
    assert await store.get("k" * 4096) == b"v"


async def test_oversized_value_is_rejected_and_old_value_kept(store: NamespacedStore) -> None:
    await store.set("key", b"old")
    with pytest.raises(ValueError, match=r"the limit is 16777216 \(max_value_bytes\)"):
        await store.set("key", b"x" * (16 * 1024 * 1024 + 1))
    assert await store.get("key") == b"old"


async def test_too_deep_namespace_is_rejected(store: NamespacedStore) -> None:
    deep = store
    for i in range(32):
        deep = deep.with_namespace(str(i))
    await deep.set("key", b"v")
    assert await deep.get("key") == b"v"
    with pytest.raises(ValueError, match=r"path has 33 segments; the limit is 32 \(max_depth\)"):
        await deep.with_namespace("33").set("key", b"v")


@pytest.mark.parametrize("value", [1, None, bytearray(b"x"), ["list"]])
async def test_value_must_be_str_or_bytes(store: NamespacedStore, value: object) -> None:
    with pytest.raises(TypeError, match="value must be str or bytes"):
        await store.set("key", value)  # type: ignore[arg-type]
    assert await store.exists("key") is False


async def test_key_must_be_valid_unicode(store: NamespacedStore) -> None:
    with pytest.raises(ValueError, match="key is not valid Unicode: surrogates not allowed"):
        await store.set("bad\ud800", b"v")


async def test_key_must_be_a_str(store: NamespacedStore) -> None:
    with pytest.raises(TypeError, match="key must be a str"):
        await store.get(b"key")  # type: ignore[arg-type]


async def test_async_with_returns_the_store(store: NamespacedStore) -> None:
    child = store.with_namespace("ctx")
    async with child as entered:
        assert entered is child
    # Leaving a child's context never closes what its parent uses.
    await store.set("key", b"still works")
    assert await store.get("key") == b"still works"
