"""Shared fixtures: one real server per session, and the stores the contract suite runs against."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from nestkv.client import GrpcStore, LocalStore, NamespacedStore
from tests.serverproc import ServerProcess


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """A real server process on a free port, shared by the session's tests."""
    with ServerProcess() as process:
        yield process


@pytest.fixture
def local_store() -> LocalStore:
    return LocalStore()


@pytest.fixture
async def grpc_store(server: ServerProcess) -> AsyncIterator[GrpcStore]:
    store = GrpcStore.with_client(server.target)
    async with store:
        await store.delete_all()
        yield store


@pytest.fixture(params=["local_store", "grpc_store"])
def store(request: pytest.FixtureRequest) -> NamespacedStore:
    """Every store the contract suite must hold for, in the manner of Litestar's store tests."""
    value: NamespacedStore = request.getfixturevalue(request.param)
    return value
