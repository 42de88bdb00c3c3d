"""Waiting for something another process or task does, with a deadline: the one polling loop of the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(condition: Callable[[], object], within: float = 30.0, interval: float = 0.01) -> None:
    """Return once `condition()` is true; fail with TimeoutError after `within` seconds.

    For conditions no event announces (a line in another process's log, a file on disk).
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - nothing to wait on: the condition is outside this loop
            await asyncio.sleep(interval)
