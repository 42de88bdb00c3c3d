"""The atomic operations' contract (increment, conditional set and delete, versions, Lock), run
against every store of the contract suite and a cluster with --replicas 2."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from nestkv.client import Lock, LockError, NamespacedStore, PreconditionFailedError

SHORT = timedelta(seconds=0.25)  # a TTL the tests wait out
WAIT = 0.5
INT64_MAX = 2**63 - 1


@pytest.fixture(
    params=[
        "local_store",
        "grpc_store",
        "secure_grpc_store",
        "cluster_store",
        "pinned_cluster_store",
        "replicated_cluster_store",
    ]
)
def store(request: pytest.FixtureRequest) -> NamespacedStore:
    value: NamespacedStore = request.getfixturevalue(request.param)
    return value


# increment


async def test_increment_creates_the_key_at_the_amount_stored_as_ascii_decimal(
    store: NamespacedStore,
) -> None:
    assert await store.increment("hits") == 1
    assert await store.increment("hits") == 2
    assert await store.increment("hits", 40) == 42
    assert await store.get("hits") == b"42"
    assert await store.increment("debt", -5) == -5
    assert await store.increment("debt", 0) == -5
    assert await store.get("debt") == b"-5"
    assert await store.increment("fresh", 0, expires_in=60) == 0  # as Redis's INCRBY key 0
    assert await store.get("fresh") == b"0"
    assert 0 < (await store.expires_in("fresh") or 0) <= 60


async def test_increment_adds_to_a_value_set_as_decimal(store: NamespacedStore) -> None:
    await store.set("n", b"-17")
    assert await store.increment("n", 20) == 3


async def test_increment_sets_the_expiry_only_when_it_creates_the_key(store: NamespacedStore) -> None:
    assert await store.increment("window", expires_in=100) == 1
    assert await store.increment("window", expires_in=5) == 2  # keeps its 100 s
    assert 95 <= (await store.expires_in("window") or 0) <= 100
    await store.set("forever", b"1")
    assert await store.increment("forever", expires_in=5) == 2
    assert await store.expires_in("forever") == -1


async def test_an_expired_counter_starts_again(store: NamespacedStore) -> None:
    assert await store.increment("window", 7, expires_in=SHORT) == 7
    await asyncio.sleep(WAIT)
    assert await store.increment("window", 1, expires_in=100) == 1


@pytest.mark.parametrize(
    "value",
    [
        b"abc",
        b"1.5",
        b" 1",
        b"1 ",
        b"+1",
        b"-",
        b"",
        b"\xff",
        b"9" * 21,
        b"9223372036854775808",
        "\u0661".encode(),
    ],
)
async def test_increment_of_a_value_that_is_not_an_integer_fails_and_leaves_it(
    store: NamespacedStore, value: bytes
) -> None:
    await store.set("text", value, expires_in=100)
    with pytest.raises(PreconditionFailedError, match="not an integer") as caught:
        await store.increment("text")
    assert caught.value.applied is False
    assert await store.get("text") == value
    assert 95 <= (await store.expires_in("text") or 0) <= 100


async def test_increment_past_the_int64_range_fails_and_leaves_the_value(store: NamespacedStore) -> None:
    await store.set("big", str(INT64_MAX - 1).encode())
    assert await store.increment("big") == INT64_MAX
    with pytest.raises(PreconditionFailedError, match="outside the signed 64-bit range"):
        await store.increment("big")
    assert await store.get("big") == str(INT64_MAX).encode()
    assert await store.increment("big", -INT64_MAX) == 0
    assert await store.increment("low", -INT64_MAX - 1) == -INT64_MAX - 1
    with pytest.raises(PreconditionFailedError):
        await store.increment("low", -1)


async def test_increment_checks_its_arguments_before_any_io(store: NamespacedStore) -> None:
    with pytest.raises(TypeError, match="amount must be an int"):
        await store.increment("k", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="amount must be an int"):
        await store.increment("k", True)
    with pytest.raises(ValueError, match="signed 64-bit range"):
        await store.increment("k", 2**63)
    with pytest.raises(ValueError, match="expires_in must be positive"):
        await store.increment("k", expires_in=0)
    assert await store.exists("k") is False


async def test_concurrent_increments_all_count(store: NamespacedStore) -> None:
    results = await asyncio.gather(*(store.increment("counter") for _ in range(500)))
    assert sorted(results) == list(range(1, 501))
    assert await store.get("counter") == b"500"


async def test_increment_is_confined_to_its_namespace(store: NamespacedStore) -> None:
    a, b = store.with_namespace("a"), store.with_namespace("b")
    assert await a.increment("n") == 1
    assert await b.increment("n", 5) == 5
    assert await a.get("n") == b"1"
    await a.delete_all()
    assert await b.get("n") == b"5"


async def test_an_increment_by_zero_reads_the_counter_without_a_new_version(store: NamespacedStore) -> None:
    assert await store.increment("n", 3) == 3
    before = await store.get_with_version("n")
    assert await store.increment("n", 0) == 3
    assert await store.get_with_version("n") == before


# set_if_absent, set_if_present, set_versioned


async def test_set_if_absent_stores_only_when_the_key_holds_no_value(store: NamespacedStore) -> None:
    assert await store.set_if_absent("k", b"first", expires_in=SHORT) is True
    assert await store.set_if_absent("k", b"second") is False
    assert await store.get("k") == b"first"
    await asyncio.sleep(WAIT)  # expired: absent again
    assert await store.set_if_absent("k", "third") is True
    assert await store.get("k") == b"third"
    assert await store.expires_in("k") == -1
    await store.delete("k")
    assert await store.set_if_absent("k", b"fourth") is True


async def test_of_concurrent_set_if_absent_calls_exactly_one_stores(store: NamespacedStore) -> None:
    results = await asyncio.gather(*(store.set_if_absent("once", str(n)) for n in range(100)))
    assert results.count(True) == 1
    assert await store.get("once") == str(results.index(True)).encode()


async def test_set_if_present_stores_only_over_a_value(store: NamespacedStore) -> None:
    assert await store.set_if_present("k", b"v") is False
    assert await store.exists("k") is False
    await store.set("k", b"old")
    assert await store.set_if_present("k", b"new", expires_in=100) is True
    assert await store.get("k") == b"new"
    assert 95 <= (await store.expires_in("k") or 0) <= 100


async def test_set_versioned_returns_the_version_stored_or_none(store: NamespacedStore) -> None:
    first = await store.set_versioned("k", b"one", if_absent=True)
    assert first is not None
    assert (await store.get_with_version("k")) == (b"one", first)
    assert await store.set_versioned("k", b"two", if_absent=True) is None
    second = await store.set_versioned("k", b"two", if_version=first)
    assert second is not None
    assert second > first
    assert await store.set_versioned("k", b"three", if_version=first) is None
    plain = await store.set_versioned("k", b"four")
    assert plain is not None
    assert plain > second
    assert await store.get("k") == b"four"
    with pytest.raises(ValueError, match="at most one condition, got if_absent and if_present"):
        await store.set_versioned("k", b"v", if_absent=True, if_present=True)


# versions, compare_and_set


async def test_get_with_version_returns_the_value_and_a_version_that_changes_with_it(
    store: NamespacedStore,
) -> None:
    assert await store.get_with_version("k") is None
    await store.set("k", b"one")
    first = await store.get_with_version("k")
    assert first is not None
    assert first.value == b"one"
    assert len(first.version) == 16
    assert await store.get_with_version("k") == first
    await store.set("k", b"two")
    second = await store.get_with_version("k")
    assert second is not None
    assert second.value == b"two"
    assert second.version > first.version


async def test_compare_and_set_stores_only_over_the_version_read(store: NamespacedStore) -> None:
    await store.set("k", b"one")
    read = await store.get_with_version("k")
    assert read is not None
    assert await store.compare_and_set("k", b"two", read.version, expires_in=100) is True
    assert await store.get("k") == b"two"
    assert await store.compare_and_set("k", b"stale", read.version) is False  # another write came between
    assert await store.get("k") == b"two"
    assert 95 <= (await store.expires_in("k") or 0) <= 100
    await store.delete("k")
    assert await store.compare_and_set("k", b"gone", read.version) is False
    assert await store.exists("k") is False


async def test_compare_and_set_checks_the_version_before_any_io(store: NamespacedStore) -> None:
    with pytest.raises(ValueError, match="a version is 16"):
        await store.compare_and_set("k", b"v", b"short")
    with pytest.raises(TypeError, match="version must be bytes"):
        await store.compare_and_set("k", b"v", "0" * 16)  # type: ignore[arg-type]


async def test_concurrent_compare_and_set_increments_lose_no_update(store: NamespacedStore) -> None:
    await store.set("n", b"0")

    async def add_one() -> None:
        while True:
            read = await store.get_with_version("n")
            assert read is not None
            if await store.compare_and_set("n", str(int(read.value) + 1), read.version):
                return

    await asyncio.gather(*(add_one() for _ in range(20)))
    assert await store.get("n") == b"20"


# delete_if


async def test_delete_if_removes_only_the_version_or_value_given(store: NamespacedStore) -> None:
    await store.set("k", b"mine")
    read = await store.get_with_version("k")
    assert read is not None
    assert await store.delete_if("k", value=b"theirs") is False
    assert await store.get("k") == b"mine"
    await store.set("k", b"mine")  # the same value, a new version
    assert await store.delete_if("k", version=read.version) is False
    assert await store.get("k") == b"mine"
    assert await store.delete_if("k", value="mine") is True
    assert await store.exists("k") is False
    assert await store.delete_if("k", value=b"mine") is False
    await store.set("k", b"again")
    again = await store.get_with_version("k")
    assert again is not None
    assert await store.delete_if("k", version=again.version) is True
    assert await store.exists("k") is False


async def test_delete_if_takes_exactly_one_condition(store: NamespacedStore) -> None:
    with pytest.raises(ValueError, match="exactly one of version and value"):
        await store.delete_if("k")
    with pytest.raises(ValueError, match="exactly one of version and value"):
        await store.delete_if("k", version=b"0" * 16, value=b"v")


# Lock


async def test_a_lock_has_one_holder_at_a_time(store: NamespacedStore) -> None:
    async with store.lock("job", expires_in=10) as held:
        assert await held.owned() is True
        assert held.version is not None
        assert (await store.get_with_version("job")) == (held.token, held.version)
        other = store.lock("job", expires_in=10, blocking_timeout=0)
        assert await other.acquire() is False
        with pytest.raises(LockError, match=r"not acquired within 0\.2 s"):
            async with store.lock("job", blocking_timeout=0.2, sleep=0.05):
                pass
        first = held.version
    assert await held.locked() is False
    async with store.lock("job", expires_in=10, blocking_timeout=0) as next_holder:
        assert next_holder.version is not None
        assert next_holder.version > first  # a fencing token: greater for every later holder


async def test_a_waiting_lock_gets_it_once_released(store: NamespacedStore) -> None:
    holder = store.lock("job", expires_in=10)
    assert await holder.acquire()
    waiter = asyncio.create_task(store.lock("job", expires_in=10, blocking_timeout=5, sleep=0.02).acquire())
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await holder.release()
    assert await waiter is True


async def test_an_expired_lock_is_taken_by_the_next_and_not_released_by_the_first(
    store: NamespacedStore,
) -> None:
    first = store.lock("job", expires_in=SHORT.total_seconds())
    assert await first.acquire()
    await asyncio.sleep(WAIT)
    second = store.lock("job", expires_in=10, blocking_timeout=0)
    assert await second.acquire()
    with pytest.raises(LockError, match="not held by this holder"):
        await first.extend()
    with pytest.raises(LockError, match="not held by this holder when released"):
        await first.release()
    assert await second.owned() is True  # the first's release did not free the second's lock
    await second.release()


async def test_extending_a_lock_keeps_it_past_its_first_expiry(store: NamespacedStore) -> None:
    lock = Lock(store, "job", expires_in=SHORT.total_seconds())
    assert await lock.acquire()
    await lock.extend(timedelta(seconds=10).total_seconds())
    await asyncio.sleep(WAIT)
    assert await lock.owned() is True
    assert await store.lock("job", blocking_timeout=0).acquire() is False
    await lock.release()
