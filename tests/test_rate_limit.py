"""nestkv.client.ratelimit: Litestar rate limiting counted with one atomic increment on the server.

In process (AsyncTestClient, over LocalStore and over a GrpcStore to a real server): the stock
middleware's behaviour, kept. Across processes (uvicorn --workers 4, tests/ratelimit_app.py):
exactly `limit` requests pass per window, where the stock middleware over Litestar's RedisStore
lets several times as many through.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from litestar import Litestar, Request, get
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.stores.registry import StoreRegistry
from litestar.testing import AsyncTestClient

from bench.servers import RedisServer, redis_server
from nestkv.client import GrpcStore, LocalStore, NamespacedStore
from nestkv.client.ratelimit import EXPIRY_MARGIN, CountingRateLimitMiddleware
from tests.ratelimit_app import WORKER_HEADER
from tests.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# In process: one app, a clock the test sets.

T0 = 1_800_000_000.0  # the start of a minute (and of an hour)
LIMIT = 3


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at


def clocked(clock: Clock) -> type[CountingRateLimitMiddleware]:
    """The middleware, numbering windows by `clock` instead of the time of day."""

    class Clocked(CountingRateLimitMiddleware):
        def now(self) -> float:
            return clock.at

    return Clocked


def user(request: Request[Any, Any, Any]) -> str:
    return request.headers.get("X-User", "anonymous")


@get("/limited")
async def limited() -> str:
    return "ok"


@get("/other")
async def other() -> str:
    return "ok"


@get("/free")
async def free() -> str:
    return "ok"


@get("/opted-out", opt={"no_rate_limit": True})
async def opted_out() -> str:
    return "ok"


@pytest.fixture(params=["local_store", "grpc_store"])
def root(request: pytest.FixtureRequest) -> NamespacedStore:
    value: NamespacedStore = request.getfixturevalue(request.param)
    return value


def make_app(root: NamespacedStore, clock: Clock, **config: Any) -> Litestar:
    rate_limit = RateLimitConfig(
        rate_limit=("minute", LIMIT),
        middleware_class=clocked(clock),
        identifier_for_request=user,
        exclude=["/free"],
        exclude_opt_key="no_rate_limit",
        **config,
    )
    return Litestar(
        route_handlers=[limited, other, free, opted_out],
        # nestkv's stores are registered with Litestar's ABCs at run time, which mypy cannot see.
        stores=StoreRegistry(default_factory=cast(Callable[[str], Store], root.with_namespace)),
        middleware=[rate_limit.middleware],
    )


@contextlib.asynccontextmanager
async def client_of(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app) as client:
        yield client


def window_key(who: str, at: float) -> str:
    return f"Clocked::{who}::60:{int(at) // 60}"


async def test_headers_count_down_and_the_request_over_the_limit_is_429(root: NamespacedStore) -> None:
    clock = Clock(T0 + 15)
    async with client_of(make_app(root, clock)) as client:
        answers = [await client.get("/limited", headers={"X-User": "alice"}) for _ in range(LIMIT + 2)]
    assert [answer.status_code for answer in answers] == [200] * LIMIT + [429, 429]
    for answer in answers:
        assert answer.headers["RateLimit-Policy"] == f"{LIMIT}; w=60"
        assert answer.headers["RateLimit-Limit"] == str(LIMIT)
        assert answer.headers["RateLimit-Reset"] == "45"  # 15 s into the minute
    assert [answer.headers["RateLimit-Remaining"] for answer in answers] == ["2", "1", "0", "0", "0"]
    # One counter on the server for the window, rejected requests counted too, and it expires
    # soon after the window ends.
    counters = root.with_namespace("rate_limit")
    assert await counters.get(window_key("alice", clock.at)) == str(LIMIT + 2).encode()
    expires_in = await counters.expires_in(window_key("alice", clock.at))
    assert expires_in is not None
    assert 60 < expires_in <= 60 + EXPIRY_MARGIN


async def test_the_next_window_counts_afresh(root: NamespacedStore) -> None:
    clock = Clock(T0 + 59)
    async with client_of(make_app(root, clock)) as client:
        last = [await client.get("/limited") for _ in range(LIMIT + 1)]
        clock.at = T0 + 60
        first = await client.get("/limited")
    assert [answer.status_code for answer in last] == [200] * LIMIT + [429]
    assert last[-1].headers["RateLimit-Reset"] == "1"
    assert first.status_code == 200
    assert first.headers["RateLimit-Remaining"] == str(LIMIT - 1)
    assert first.headers["RateLimit-Reset"] == "60"


async def test_the_limit_is_per_identifier_over_every_route(root: NamespacedStore) -> None:
    clock = Clock(T0)
    async with client_of(make_app(root, clock)) as client:
        alice = [await client.get(path, headers={"X-User": "alice"}) for path in ("/limited", "/other")]
        alice += [await client.get("/limited", headers={"X-User": "alice"}) for _ in range(2)]
        bob = await client.get("/other", headers={"X-User": "bob"})
    # As the stock middleware keys: the identifier, not the route.
    assert [answer.status_code for answer in alice] == [200, 200, 200, 429]
    assert bob.status_code == 200
    assert bob.headers["RateLimit-Remaining"] == str(LIMIT - 1)
    counters = root.with_namespace("rate_limit")
    assert await counters.get(window_key("alice", T0)) == b"4"
    assert await counters.get(window_key("bob", T0)) == b"1"


async def test_excluded_paths_and_opted_out_routes_are_not_counted(root: NamespacedStore) -> None:
    clock = Clock(T0)
    async with client_of(make_app(root, clock)) as client:
        skipped = [await client.get(path) for path in ("/free", "/opted-out") * (LIMIT + 1)]
        counted = await client.get("/limited")
    assert all(answer.status_code == 200 for answer in skipped)
    assert all("RateLimit-Remaining" not in answer.headers for answer in skipped)
    assert counted.headers["RateLimit-Remaining"] == str(LIMIT - 1)
    assert await root.with_namespace("rate_limit").get(window_key("anonymous", T0)) == b"1"


async def test_check_throttle_handler_and_no_headers(root: NamespacedStore) -> None:
    clock = Clock(T0)

    def only_alice(request: Request[Any, Any, Any]) -> bool:
        return request.headers.get("X-User") == "alice"

    app = make_app(root, clock, check_throttle_handler=only_alice, set_rate_limit_headers=False)
    async with client_of(app) as client:
        alice = [await client.get("/limited", headers={"X-User": "alice"}) for _ in range(LIMIT + 1)]
        bob = [await client.get("/limited", headers={"X-User": "bob"}) for _ in range(LIMIT + 1)]
    assert [answer.status_code for answer in alice] == [200] * LIMIT + [429]
    assert [answer.status_code for answer in bob] == [200] * (LIMIT + 1)
    assert not any(name.startswith("ratelimit-") for answer in alice for name in answer.headers)
    assert await root.with_namespace("rate_limit").get(window_key("bob", T0)) is None


async def test_concurrent_requests_in_one_process_pass_exactly_the_limit(root: NamespacedStore) -> None:
    clock = Clock(T0)
    async with client_of(make_app(root, clock)) as client:
        answers = await asyncio.gather(*(client.get("/limited") for _ in range(50)))
    assert collections.Counter(answer.status_code for answer in answers) == {200: LIMIT, 429: 50 - LIMIT}
    passed = sorted(answer.headers["RateLimit-Remaining"] for answer in answers if answer.status_code == 200)
    assert passed == [str(remaining) for remaining in range(LIMIT)]


async def test_a_store_without_increment_is_a_type_error_naming_what_is_needed() -> None:
    errors: list[Exception] = []

    async def record(exception: Exception, scope: Any) -> None:
        errors.append(exception)

    config = RateLimitConfig(rate_limit=("minute", LIMIT), middleware_class=CountingRateLimitMiddleware)
    app = Litestar(
        route_handlers=[limited],
        stores={"rate_limit": MemoryStore()},
        middleware=[config.middleware],
        after_exception=[record],
    )
    async with client_of(app) as client:
        answer = await client.get("/limited")
    assert answer.status_code == 500
    assert len(errors) == 1
    assert isinstance(errors[0], TypeError)
    message = str(errors[0])
    assert "increment(key, amount, expires_in)" in message
    assert "'rate_limit' is a litestar.stores.memory.MemoryStore" in message
    assert "nestkv GrpcStore" in message


def test_nestkv_client_imports_neither_this_module_nor_litestar_for_it() -> None:
    # Litestar is optional: without it nestkv.client imports, and only this module needs it.
    code = (
        "import sys\n"
        "sys.modules['litestar'] = None\n"
        "import nestkv.client\n"
        "assert 'nestkv.client.ratelimit' not in sys.modules\n"
        "try:\n"
        "    import nestkv.client.ratelimit\n"
        "except ImportError as e:\n"
        "    print('ImportError', e.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ImportError litestar"), done.stdout


def test_local_store_counts_as_a_counting_store() -> None:
    from nestkv.client.ratelimit import CountingStore

    assert isinstance(LocalStore(), CountingStore)
    assert not isinstance(MemoryStore(), CountingStore)


# ---------------------------------------------------------------------------------------------
# Across processes: a real app served by 4 uvicorn workers, hit by concurrent httpx clients.

WORKERS = 4
PER_MINUTE = 25
BURST = 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def uvicorn_workers(store_url: str, middleware: str, log: Path) -> Iterator[str]:
    """tests/ratelimit_app.py served by WORKERS uvicorn worker processes: the base URL, once
    every worker has started and the app answers. Stopped, workers and all, on exit."""
    port = free_port()
    env = {
        **os.environ,
        "RATELIMIT_STORE": store_url,
        "RATELIMIT_MIDDLEWARE": middleware,
        "RATELIMIT_LIMIT": str(PER_MINUTE),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "tests.ratelimit_app:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS), "--no-access-log"]
    with log.open("wb") as out:
        # A session of its own: its process group is uvicorn and its workers, to stop together.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            started = log.read_text().count("Application startup complete")
            if started == WORKERS and _answers(base + "/health"):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start {WORKERS} workers:\n{log.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)  # uvicorn stops its workers, then itself
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def burst(base: str, source: str) -> list[httpx.Response]:
    """BURST requests at once, each from its own httpx client (its own connection) bound to the
    loopback address `source`, the identifier the app limits (get_remote_address)."""

    async def one() -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(local_address=source)
        async with httpx.AsyncClient(base_url=base, timeout=60, transport=transport) as client:
            return await client.get("/limited")

    return await asyncio.gather(*(one() for _ in range(BURST)))


def spread_burst(base: str) -> tuple[str, int, list[httpx.Response]]:
    """A burst that reached every worker within one minute: (its identifier, the minute, answers).

    Tried again, from another loopback address (a fresh identifier, so a fresh count), should
    the kernel have handed no connection to some worker, or the minute have turned meanwhile
    (a burst starts at least 15 s before the minute's end, and takes a second or two)."""
    reached: dict[str, int] = {}
    for attempt in range(2, 7):
        source = f"127.0.0.{attempt}"
        left = 60 - time.time() % 60
        if left < 15:
            time.sleep(left + 0.1)
        minute = int(time.time()) // 60
        answers = asyncio.run(burst(base, source))
        reached = dict(collections.Counter(answer.headers[WORKER_HEADER] for answer in answers))
        if len(reached) == WORKERS and int(time.time()) // 60 == minute:
            return source, minute, answers
    pytest.fail(f"no burst reached all {WORKERS} workers within a minute; the last: {reached}")


def summary(answers: list[httpx.Response]) -> tuple[int, dict[str, int]]:
    """How many passed, and how many answers each worker gave."""
    assert {answer.status_code for answer in answers} <= {200, 429}
    passed = sum(answer.status_code == 200 for answer in answers)
    return passed, dict(collections.Counter(answer.headers[WORKER_HEADER] for answer in answers))


def test_four_workers_pass_exactly_the_limit_with_nestkv(tmp_path: Path) -> None:
    with (
        ServerProcess() as server,
        uvicorn_workers(f"nestkv://{server.target}", "counting", tmp_path / "log") as base,
    ):
        source, minute, answers = spread_burst(base)
        key = f"CountingRateLimitMiddleware::{source}::60:{minute}"
        counted = asyncio.run(counter_of(server.target, key))
    passed, by_worker = summary(answers)
    print(
        f"\nnestkv, {WORKERS} uvicorn workers: {passed} of {BURST} passed (limit {PER_MINUTE}); {by_worker}"
    )
    assert passed == PER_MINUTE, f"{passed} of {BURST} passed with nestkv, limit {PER_MINUTE}"
    # Each count from 1 to the limit went to exactly one request: the server counted them in turn.
    remaining = sorted(int(a.headers["RateLimit-Remaining"]) for a in answers if a.status_code == 200)
    assert remaining == list(range(PER_MINUTE))
    assert all(a.headers["RateLimit-Remaining"] == "0" for a in answers if a.status_code == 429)
    assert counted == str(BURST).encode()  # one counter for the window, every request in it


async def counter_of(target: str, key: str) -> bytes | None:
    async with GrpcStore.with_client(target) as store:
        return await store.with_namespace("rate_limit").get(key)


def test_four_workers_pass_several_times_the_limit_with_the_stock_middleware_over_redis(
    tmp_path: Path,
) -> None:
    """The reason for nestkv.client.ratelimit: Litestar's own middleware, over a shared RedisStore."""
    with redis_server() as redis:
        if not isinstance(redis, RedisServer):
            pytest.skip(redis)
        with uvicorn_workers(f"redis://127.0.0.1:{redis.port}", "stock", tmp_path / "log") as base:
            _, _, answers = spread_burst(base)
    passed, by_worker = summary(answers)
    print(
        f"\nstock RateLimitMiddleware over RedisStore, {WORKERS} uvicorn workers: "
        f"{passed} of {BURST} passed (limit {PER_MINUTE}, {passed / PER_MINUTE:.1f}x); {by_worker}"
    )
    assert passed > PER_MINUTE, (
        f"the stock middleware let {passed} of {BURST} through with {WORKERS} workers, limit {PER_MINUTE}"
    )
