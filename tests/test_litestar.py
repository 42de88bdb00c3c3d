"""GrpcStore as the store of a Litestar app: server-side sessions, response caching, rate limiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
from litestar import Litestar, Request, get, post
from litestar.config.response_cache import ResponseCacheConfig
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.middleware.session.server_side import ServerSideSessionConfig
from litestar.stores.base import Store
from litestar.stores.registry import StoreRegistry
from litestar.testing import TestClient

from nestkv.client import GrpcStore
from tests.conftest import SecureServer
from tests.serverproc import ServerProcess

calls = {"cached": 0}


@post("/login")
async def login(request: Request[Any, Any, Any]) -> None:
    request.set_session({"user": "alice"})


@get("/me")
async def me(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return dict(request.session)


@get("/cached", cache=True)
async def cached() -> dict[str, int]:
    calls["cached"] += 1
    return {"calls": calls["cached"]}


@get("/limited")
async def limited() -> str:
    return "ok"


def make_app(root: GrpcStore) -> Litestar:
    # Built outside any event loop, as an app module does at import time. The casts are for mypy
    # only: GrpcStore is registered with Litestar's ABCs at run time, which static typing cannot see.
    return Litestar(
        route_handlers=[login, me, cached, limited],
        stores=StoreRegistry(
            # A store given by name is entered as a lifespan manager.
            stores={"sessions": cast(Store, root.with_namespace("sessions"))},
            default_factory=cast(Callable[[str], Store], root.with_namespace),
        ),
        lifespan=[root],  # closes the channel when the app shuts down
        middleware=[
            ServerSideSessionConfig().middleware,
            RateLimitConfig(rate_limit=("minute", 3), exclude=["/login", "/me", "/cached"]).middleware,
        ],
        response_cache_config=ResponseCacheConfig(default_expiration=60),
    )


Connect = Callable[[], GrpcStore]


@pytest.fixture(params=["plaintext", "tls_and_token"])
def connect(request: pytest.FixtureRequest) -> Connect:
    """Opens a root store on the app's server: plaintext, or over TLS with a token rooted at ["tenant"]."""
    if request.param == "plaintext":
        server: ServerProcess = request.getfixturevalue("server")
        return lambda: GrpcStore.with_client(server.target)
    secure: SecureServer = request.getfixturevalue("secure_server")
    return lambda: GrpcStore.with_client(secure.target, credentials=secure.credentials, token=secure.token)


@pytest.fixture
def app(connect: Connect) -> Litestar:
    root = connect()
    asyncio.run(root.delete_all())
    return make_app(root)


def on_server(connect: Connect, *namespaces: str) -> GrpcStore:
    """A separate client on the same server, to look at what the app stored."""
    store = connect()
    for namespace in namespaces:
        store = store.with_namespace(namespace)
    return store


def test_server_side_sessions_live_in_the_store(app: Litestar, connect: Connect) -> None:
    with TestClient(app) as client:
        assert client.post("/login").status_code == 201
        session_id = client.cookies["session"]
        assert client.get("/me").json() == {"user": "alice"}
    sessions = on_server(connect, "sessions")
    assert asyncio.run(sessions.exists(session_id)) is True
    assert asyncio.run(sessions.expires_in(session_id)) == 1_209_600  # Litestar's default max_age, renewed
    # A fresh app (new loop, new lifespan) on the same server still knows the session.
    with TestClient(app) as client:
        client.cookies["session"] = session_id
        assert client.get("/me").json() == {"user": "alice"}


def test_response_cache_lives_in_the_store(app: Litestar, connect: Connect) -> None:
    with TestClient(app) as client:
        first = client.get("/cached").json()
        assert client.get("/cached").json() == first  # served from the cache
        asyncio.run(on_server(connect, "response_cache").delete_all())
        assert client.get("/cached").json() == {"calls": first["calls"] + 1}


def test_rate_limit_counts_in_the_store(app: Litestar, connect: Connect) -> None:
    with TestClient(app) as client:
        assert [client.get("/limited").status_code for _ in range(4)] == [200, 200, 200, 429]
        asyncio.run(on_server(connect, "rate_limit").delete_all())
        assert client.get("/limited").status_code == 200
