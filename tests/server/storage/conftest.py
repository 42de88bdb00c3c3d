"""The storage tests' clock and store: a clock each test moves by hand, and a NamespacedStorage on it."""

from __future__ import annotations

import pytest

from nestkv.server.storage import NamespacedStorage


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def storage(clock: FakeClock) -> NamespacedStorage:
    return NamespacedStorage(clock)
