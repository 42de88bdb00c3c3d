"""Litestar rate limiting that counts on the nestkv server: exact across any number of workers.

    from litestar.middleware.rate_limit import RateLimitConfig
    from nestkv.client.ratelimit import CountingRateLimitMiddleware

    root = GrpcStore.with_client("127.0.0.1:50051")
    app = Litestar(
        ...,
        stores=StoreRegistry(default_factory=root.with_namespace),  # "rate_limit" is a namespace
        lifespan=[root],
        middleware=[
            RateLimitConfig(("minute", 100), middleware_class=CountingRateLimitMiddleware).middleware
        ],
    )

Why: Litestar's `RateLimitMiddleware` reads the identifier's history from the store, checks it
and writes it back, under an anyio lock that only its own process sees (litestar#4700). Worker
processes race on that get-then-set and overwrite each other's counts, so N workers let about N x
the limit through (tests/test_rate_limit.py shows it over Litestar's RedisStore with 4 workers).

What: a FIXED WINDOW, counted with one atomic `increment` per request on the server (one
operation, one round trip, no lock in the client). The window of a request is
`int(time.time()) // window_seconds`; its counter is the key
`"{cache key of the stock middleware}::{window_seconds}:{window number}"`, created at 1 with an
expiry of the window's length (plus EXPIRY_MARGIN), so it is gone soon after its window ends. A
request passes iff the count the server returns is <= the limit: whatever the number of
processes, exactly `limit` requests pass per identifier and window.

The cost of a fixed window: the limit holds per window, not per any span of that length. A
client that sends `limit` requests at the end of one window and `limit` at the start of the next
gets up to 2 x limit through within one window's length. (A sliding window or GCRA computed on
the server as one operation would close that, but needs an operation the store does not offer;
approximating one from two fixed-window counters would no longer be exact.)

Kept from the stock middleware (everything but the counting): the config (`RateLimitConfig`, its
`rate_limit` unit and quantity, `exclude`, `exclude_opt_key`, `identifier_for_request`,
`check_throttle_handler`, `set_rate_limit_headers` and the header names, `store`), its cache key
(the identifier, not the route: one limit per identifier over every route the middleware
covers, as the stock one keys), the store from `app.stores.get(config.store)`, the 429 by
TooManyRequestsException, and the headers RateLimit-Policy ("<limit>; w=<seconds>"),
RateLimit-Limit, RateLimit-Remaining (max(limit - count, 0)) and RateLimit-Reset (seconds until
the window ends).

Different from it: windows are aligned to the clock (the stock one starts a window at an
identifier's first request), so the app processes' clocks must agree (NTP) for them to share a
window; and a rejected request is counted too (the counter keeps rising past the limit, which
changes nothing but the counter itself).

The store must have `increment(key, amount, expires_in) -> int`, atomic where the key lives
(nestkv's GrpcStore; a LocalStore too, but it counts within one process only): any other raises
TypeError at the first request counted. A subclass's overrides of the stock middleware's
history hooks (`retrieve_cached_history`, `set_cached_history`, `create_send_wrapper`,
`create_response_headers`) are not called: there is no history, only the count.

This module imports Litestar; `import nestkv.client` does not import this module.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import TooManyRequestsException
from litestar.middleware.rate_limit import DURATION_VALUES, RateLimitConfig, RateLimitMiddleware

if TYPE_CHECKING:
    from litestar import Litestar, Request
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["EXPIRY_MARGIN", "CountingRateLimitMiddleware", "CountingStore"]

EXPIRY_MARGIN = 5
"""Seconds a window's counter outlives the window (it is created at the earliest at its start)."""


@runtime_checkable
class CountingStore(Protocol):
    """A store that adds to a counter atomically where the key lives (nestkv's NamespacedStore)."""

    async def increment(self, key: str, amount: int = 1, expires_in: int | timedelta | None = None) -> int:
        """Add `amount`, creating the key at `amount` with `expires_in` when absent; the sum."""
        ...


class CountingRateLimitMiddleware(RateLimitMiddleware):
    """Litestar's RateLimitMiddleware, counting each request with one `increment` on the store.

    Use it as `RateLimitConfig(..., middleware_class=CountingRateLimitMiddleware)`.
    """

    def __init__(self, app: ASGIApp, config: RateLimitConfig) -> None:
        super().__init__(app, config)
        self.window_seconds = DURATION_VALUES[self.unit]
        self._counting_store: CountingStore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Called only for what the config does not exclude (AbstractMiddleware wraps it).
        app = scope["litestar_app"]
        request: Request[Any, Any, Any] = app.request_class(scope)
        if await self.should_check_request(request=request):
            count, reset = await self.count_request(request, self.counting_store(app))
            headers = self.counting_headers(count, reset) if self.config.set_rate_limit_headers else None
            if count > self.max_requests:
                raise TooManyRequestsException(headers=headers)
            if headers is not None:
                send = self.send_with_headers(send, headers)
        await self.app(scope, receive, send)

    def now(self) -> float:
        """The time windows are numbered by: seconds since the epoch."""
        return time.time()

    async def count_request(self, request: Request[Any, Any, Any], store: CountingStore) -> tuple[int, int]:
        """Count the request in its window: (the window's count with it, seconds to the window's end)."""
        now = int(self.now())
        window = now // self.window_seconds
        key = f"{self.cache_key_from_request(request)}::{self.window_seconds}:{window}"
        count = await store.increment(key, 1, expires_in=self.window_seconds + EXPIRY_MARGIN)
        return count, (window + 1) * self.window_seconds - now

    def counting_store(self, app: Litestar) -> CountingStore:
        """The app's store named by the config, once checked to count atomically."""
        store: object = self.config.get_store_from_app(app)
        checked = self._counting_store
        if checked is not None and store is checked:
            return checked
        if not isinstance(store, CountingStore):
            raise TypeError(
                f"{type(self).__name__} counts each request with one atomic "
                f"`increment(key, amount, expires_in) -> int` on the store, and the app's store "
                f"{self.config.store!r} is a {type(store).__module__}.{type(store).__qualname__}, "
                f"which has no `increment`. Give the app a nestkv GrpcStore under that name "
                f"(a LocalStore counts within one process only), e.g. "
                f"Litestar(stores=StoreRegistry(default_factory=GrpcStore.with_client(target).with_namespace))."
            )
        self._counting_store = store
        return store

    def counting_headers(self, count: int, reset: int) -> dict[str, str]:
        """The RateLimit-* headers of a request that made the window's count `count`."""
        return {
            self.config.rate_limit_policy_header_key: f"{self.max_requests}; w={self.window_seconds}",
            self.config.rate_limit_limit_header_key: str(self.max_requests),
            self.config.rate_limit_remaining_header_key: str(max(self.max_requests - count, 0)),
            self.config.rate_limit_reset_header_key: str(reset),
        }

    @staticmethod
    def send_with_headers(send: Send, headers: dict[str, str]) -> Send:
        """`send`, adding `headers` to the response's start."""

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                response_headers = MutableScopeHeaders(message)
                for name, value in headers.items():
                    response_headers[name] = value
            await send(message)

        return send_wrapper
