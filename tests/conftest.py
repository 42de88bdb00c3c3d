"""Shared fixtures: one real server per session, and the stores the contract suite runs against."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from nestkv.client import GrpcStore, LocalStore, NamespacedStore, channel_options
from tests.clusterproc import ClusterProcesses
from tests.pki import AuthFile, Pki, make_pki
from tests.serverproc import ServerProcess


def pytest_configure(config: pytest.Config) -> None:
    """Under NESTKV_TEST_INSTALLED (make test), refuse to run unless nestkv is the installed wheel.

    The servers the tests start run `sys.executable -m nestkv.server`: the same nestkv as here.
    """
    if not os.environ.get("NESTKV_TEST_INSTALLED"):
        return
    import nestkv.client
    import nestkv.server
    import nestkv.v1

    for package in (nestkv.server, nestkv.client, nestkv.v1):
        location = Path(package.__path__[0]).resolve()
        if not location.is_relative_to(Path(sys.prefix).resolve()):
            raise pytest.UsageError(
                f"NESTKV_TEST_INSTALLED is set, but {package.__name__} is {location}, "
                f"not installed in {sys.prefix}"
            )


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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with server and client certificates (and an unrelated CA), made for this session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass(frozen=True)
class SecureServer:
    """A server process serving TLS with an auth file, and a token of it rooted at ["tenant"]."""

    process: ServerProcess
    auth_file: AuthFile
    credentials: grpc.ChannelCredentials
    token: str

    @property
    def target(self) -> str:
        return self.process.target


@pytest.fixture(scope="session")
def secure_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    auth_file = AuthFile(tmp_path_factory.mktemp("auth") / "tokens.toml")
    token = auth_file.mint("tenant", ["tenant"], "readwrite")
    tls = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    with ServerProcess(*tls, "--auth-file", str(auth_file.path)) as process:
        yield SecureServer(process, auth_file, pki.credentials(), token)


@pytest.fixture
async def secure_grpc_store(secure_server: SecureServer) -> AsyncIterator[GrpcStore]:
    """A GrpcStore over TLS whose token confines it to ["tenant"]: its root is that namespace."""
    store = GrpcStore.with_client(
        secure_server.target, credentials=secure_server.credentials, token=secure_server.token
    )
    async with store:
        await store.delete_all()
        yield store


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    """Three real nodes on this machine, each with its own data directory and metrics."""
    with ClusterProcesses(tmp_path_factory.mktemp("cluster"), 3, "--metrics-port", "0") as nodes:
        yield nodes


@pytest.fixture
async def cluster_store(cluster: ClusterProcesses) -> AsyncIterator[GrpcStore]:
    """The topology-aware client: given one node, it sends each operation to the key's owner."""
    store = GrpcStore.with_client(cluster.target("node-0"))
    async with store:
        await store.delete_all()
        yield store


@pytest.fixture
async def pinned_cluster_store(cluster: ClusterProcesses) -> AsyncIterator[GrpcStore]:
    """A client on a channel of its own to one node, which forwards what other nodes own."""
    channel = grpc.aio.insecure_channel(cluster.target("node-1"), options=channel_options())
    store = GrpcStore(channel)
    await store.delete_all()
    yield store
    await channel.close()


@pytest.fixture(scope="session")
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    """Three real nodes with --replicas 2."""
    directory = tmp_path_factory.mktemp("replicated")
    with ClusterProcesses(directory, 3, "--replicas", "2") as nodes:
        yield nodes


@pytest.fixture
async def replicated_cluster_store(replicated_cluster: ClusterProcesses) -> AsyncIterator[GrpcStore]:
    """The topology-aware client of a cluster with --replicas 2, once every node is current."""
    for node in replicated_cluster.nodes.values():
        await node.ready()
    store = GrpcStore.with_client(replicated_cluster.target("node-0"))
    async with store:
        await store.delete_all()
        yield store


@pytest.fixture(
    params=["local_store", "grpc_store", "secure_grpc_store", "cluster_store", "pinned_cluster_store"]
)
def store(request: pytest.FixtureRequest) -> NamespacedStore:
    """Every store the contract suite must hold for, in the manner of Litestar's store tests."""
    value: NamespacedStore = request.getfixturevalue(request.param)
    return value
