"""The Litestar app tests/test_rate_limit.py serves with several uvicorn workers:

    uvicorn --factory tests.ratelimit_app:create_app --workers 4

Read from the environment:
    RATELIMIT_STORE       nestkv://HOST:PORT (a GrpcStore) or redis://HOST:PORT (Litestar's RedisStore)
    RATELIMIT_MIDDLEWARE  counting (nestkv.client.ratelimit), stock (Litestar's RateLimitMiddleware)
                          or none (no rate limiting: the ceiling bench/ratelimit.py measures against)
    RATELIMIT_LIMIT       requests per minute (not read with none)

GET /limited is limited, GET /health is excluded. Every response, a 429 too, says which worker
process answered in X-Worker-Pid.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

from litestar import Litestar, get
from litestar.datastructures import MutableScopeHeaders
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig, RateLimitMiddleware
from litestar.stores.base import NamespacedStore, Store
from litestar.stores.registry import StoreRegistry
from litestar.types import Message, Scope

from nestkv.client import GrpcStore
from nestkv.client.ratelimit import CountingRateLimitMiddleware

WORKER_HEADER = "X-Worker-Pid"
MIDDLEWARES: dict[str, type[RateLimitMiddleware]] = {
    "counting": CountingRateLimitMiddleware,
    "stock": RateLimitMiddleware,
}


@get("/limited")
async def limited() -> str:
    return "ok"


@get("/health")
async def health() -> str:
    return "ok"


async def tell_worker(message: Message, scope: Scope) -> None:
    if message["type"] == "http.response.start":
        MutableScopeHeaders.from_message(message)[WORKER_HEADER] = str(os.getpid())


def root_store(url: str) -> NamespacedStore:
    """The store whose namespaces the app's stores are."""
    scheme, _, address = url.partition("://")
    if scheme == "nestkv":
        # GrpcStore is registered with Litestar's ABCs at run time, which mypy cannot see.
        return cast(NamespacedStore, GrpcStore.with_client(address))
    if scheme == "redis":
        from litestar.stores.redis import RedisStore

        return RedisStore.with_client(url)
    raise ValueError(f"RATELIMIT_STORE: nestkv://HOST:PORT or redis://HOST:PORT, not {url!r}")


def create_app() -> Litestar:
    root = root_store(os.environ["RATELIMIT_STORE"])
    name = os.environ["RATELIMIT_MIDDLEWARE"]
    middleware: list[DefineMiddleware] = []
    if name != "none":
        config = RateLimitConfig(
            rate_limit=("minute", int(os.environ["RATELIMIT_LIMIT"])),
            exclude=["/health"],
            middleware_class=MIDDLEWARES[name],
        )
        middleware.append(config.middleware)
    return Litestar(
        route_handlers=[limited, health],
        stores=StoreRegistry(default_factory=cast(Callable[[str], Store], root.with_namespace)),
        lifespan=[root],  # closes the client when the worker stops
        middleware=middleware,
        before_send=[tell_worker],
    )
