"""Model-based: GrpcStore on a real server against a pure-Python model of the contract.

Hypothesis drives random sequences of every operation (nested namespaces,
delete_all of subtrees, short and long expiries on the real clock) and
checks each answer against the model; with --data-dir, the sequences also
restart the server. NESTKV_SOAK=1 (make soak) runs many more steps.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from nestkv.client import GrpcStore
from tests.serverproc import ServerProcess

T = TypeVar("T")
SOAK = os.environ.get("NESTKV_SOAK") == "1"
Path_ = tuple[str, ...]

# Few paths and keys, so that operations meet: a namespace, its child and a
# sibling; an empty key, a non-ASCII key and one with a separator in it.
PATHS: list[Path_] = [(), ("a",), ("a", "b"), ("a_b",)]
KEYS = ["k2", "", "ключ", "a:b"]
paths = st.sampled_from(PATHS)
keys = st.sampled_from(KEYS)
values = st.binary(max_size=24)
ttls = st.sampled_from([None, None, 0.3, 100])
Place = tuple[Path_, str]


class Entry:
    """A value and the window its deadline lies in (None: no expiry).

    The server takes its deadline at some moment during the call that set it,
    so the model knows it only between the call's start and end (+ the span).
    """

    __slots__ = ("earliest", "latest", "value")

    def __init__(self, value: bytes, earliest: float | None = None, latest: float | None = None) -> None:
        self.value = value
        self.earliest = earliest
        self.latest = latest


class StoreMachine(RuleBasedStateMachine):
    """The model: {(path, key): Entry}, deadlines on this process's monotonic clock."""

    data_dir: ClassVar[Path | None] = None
    server: ClassVar[ServerProcess | None] = None
    written = Bundle("written")  # (path, key) pairs set before: most reads and deletes go there

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.model: dict[tuple[Path_, str], Entry] = {}
        self.restarts = 0
        self.root = self.open_store()

    def open_store(self) -> GrpcStore:
        assert self.server is not None
        return GrpcStore.with_client(self.server.target)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def timed(self, coroutine: Coroutine[Any, Any, T]) -> tuple[T, float, float]:
        """The result, and the monotonic times before and after: the server acted in between."""
        started = time.monotonic()
        result = self.runner.run(coroutine)
        return result, started, time.monotonic()

    def at(self, path: Path_) -> GrpcStore:
        store = self.root
        for segment in path:
            store = store.with_namespace(segment)
        return store

    def alive(self, path: Path_, key: str, started: float, ended: float) -> bool | None:
        """Whether the key held a value for a read done between `started` and `ended`.

        True or False when the deadline window says so, None when the read and
        the deadline may have crossed (then either answer is right).
        """
        entry = self.model.get((path, key))
        if entry is None:
            return False
        if entry.earliest is None or entry.latest is None:
            return True
        if ended < entry.earliest:
            return True
        if started >= entry.latest:
            del self.model[path, key]
            return False
        return None

    def settle(self, path: Path_, key: str, seen: bool) -> None:
        """After an uncertain answer, make the model agree with what the store showed."""
        if not seen:
            self.model.pop((path, key), None)

    @initialize()
    def empty(self) -> None:
        self.run(self.root.delete_all())

    @rule(target=written, path=paths, key=keys, value=values, ttl=ttls)
    def set(self, path: Path_, key: str, value: bytes, ttl: float | None) -> Place:
        span = None if ttl is None else timedelta(seconds=ttl)
        _, started, ended = self.timed(self.at(path).set(key, value, expires_in=span))
        self.model[path, key] = Entry(value) if ttl is None else Entry(value, started + ttl, ended + ttl)
        return path, key

    @rule(place=written, value=values, ttl=ttls)
    def overwrite(self, place: Place, value: bytes, ttl: float | None) -> None:
        self.set(*place, value, ttl)

    @rule(place=st.one_of(written, st.tuples(paths, keys)), renew=st.sampled_from([None, None, 50]))
    def get(self, place: Place, renew: int | None) -> None:
        path, key = place
        got, started, ended = self.timed(self.at(path).get(key, renew_for=renew))
        expected = self.alive(path, key, started, ended)
        if expected is None:
            self.settle(path, key, got is not None)
        elif expected:
            assert got == self.model[path, key].value
        else:
            assert got is None
        entry = self.model.get((path, key))
        if got is not None and entry is not None and renew is not None and entry.earliest is not None:
            entry.earliest, entry.latest = started + renew, ended + renew

    @rule(place=st.one_of(written, st.tuples(paths, keys)))
    def exists(self, place: Place) -> None:
        path, key = place
        got, started, ended = self.timed(self.at(path).exists(key))
        expected = self.alive(path, key, started, ended)
        if expected is None:
            self.settle(path, key, got)
        else:
            assert got is expected

    @rule(place=st.one_of(written, st.tuples(paths, keys)))
    def expires_in(self, place: Place) -> None:
        path, key = place
        got, started, ended = self.timed(self.at(path).expires_in(key))
        expected = self.alive(path, key, started, ended)
        if expected is None:
            self.settle(path, key, got is not None)
        elif not expected:
            assert got is None
        else:
            entry = self.model[path, key]
            if entry.earliest is None or entry.latest is None:
                assert got == -1
            else:
                assert got is not None  # seconds left, rounded to the nearest
                assert entry.earliest - ended - 1 <= got <= entry.latest - started + 1

    @rule(place=st.one_of(written, st.tuples(paths, keys)))
    def delete(self, place: Place) -> None:
        path, key = place
        self.run(self.at(path).delete(key))
        self.model.pop((path, key), None)

    @rule(path=paths)
    def delete_all(self, path: Path_) -> None:
        self.run(self.at(path).delete_all())
        for entry_path, key in list(self.model):
            if entry_path[: len(path)] == path:
                del self.model[entry_path, key]

    @rule(path=paths, chosen=st.lists(keys, max_size=4, unique=True), value=values)
    def bulk(self, path: Path_, chosen: list[str], value: bytes) -> None:
        self.run(self.at(path).set_many(dict.fromkeys(chosen, value)))
        for key in chosen:
            self.model[path, key] = Entry(value)
        got = self.run(self.at(path).get_many(chosen))
        assert got == [value] * len(chosen)

    @precondition(lambda self: self.data_dir is not None and self.restarts < 2)
    @rule()
    def restart(self) -> None:
        assert self.server is not None
        self.run(self.root.close())
        self.server.stop()
        type(self).server = ServerProcess("--data-dir", str(self.data_dir)).start()
        self.root = self.open_store()
        self.restarts += 1

    @invariant()
    def store_matches_model(self) -> None:
        """After every step, every place holds what the model says (one get_many per namespace)."""
        assert self.server is not None
        assert self.server.process.poll() is None
        for path in PATHS:
            got, started, ended = self.timed(self.at(path).get_many(KEYS))
            expected = [self.alive(path, key, started, ended) for key in KEYS]
            for key, alive, value in zip(KEYS, expected, got, strict=True):
                if alive is None:
                    self.settle(path, key, value is not None)
                elif alive:
                    assert value == self.model[path, key].value, (path, key)
                else:
                    assert value is None, (path, key)

    def teardown(self) -> None:
        self.run(self.root.close())
        self.runner.close()


def run_machine(examples: int, steps: int) -> None:
    machine_settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    run_state_machine_as_test(StoreMachine, settings=machine_settings)


def test_grpc_store_matches_the_model(server: ServerProcess) -> None:
    StoreMachine.server, StoreMachine.data_dir = server, None
    run_machine(examples=400 if SOAK else 40, steps=100 if SOAK else 50)  # 2,000 steps in CI


def test_grpc_store_matches_the_model_across_restarts(tmp_path: Path) -> None:
    StoreMachine.data_dir = tmp_path
    StoreMachine.server = ServerProcess("--data-dir", str(tmp_path)).start()
    try:
        run_machine(examples=50 if SOAK else 6, steps=80 if SOAK else 40)
    finally:
        StoreMachine.server.stop()
