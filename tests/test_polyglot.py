"""A Node.js client built from the .proto alone talks to the server, both ways: in plaintext,
over TLS with a token sent as grpc-js call credentials, and through one node of a cluster,
which forwards its operations to their keys' owners. And a Node.js placement written from the
.proto's comment alone computes tests/placement_vectors.json: a client in any language can route
on its own from the spec."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from nestkv.client import GrpcStore, channel_options
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from nestkv.wire.placement import Placement
from tests.clusterproc import ClusterProcesses
from tests.conftest import SecureServer
from tests.pki import Pki
from tests.serverproc import ServerProcess

POLYGLOT = Path(__file__).parent / "polyglot"
PROTOS = Path(__file__).parent.parent / "protos"
GOOGLEAPIS = Path(status_pb2.__file__).parents[2]
"""Where googleapis-common-protos (grpcio-status's dependency) keeps google/rpc/*.proto."""
VECTORS = Path(__file__).parent / "placement_vectors.json"
SPREAD_KEYS = [f"spread-{n}" for n in range(16)]
"""The keys client.js writes besides from-node (and reads back), each with the value "KEY from node"."""
COUNTERS = ["counter-from-node", "big-from-node"]
"""The keys client.js creates with the Increment RPC: +5 twice (in a 60 s window), and +2**53 + 1."""
BIG = 2**53 + 1
"""What client.js adds to big-from-node, as a decimal string: more than a JS Number holds exactly."""
CALL_FAILED = 2
"""client.js's exit code when an RPC fails with a gRPC status (it prints {"error": ...})."""
UNAUTHENTICATED = 16
FAILED_PRECONDITION = 9


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable (placement.js needs nothing else: no npm package)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js placement cannot run")
    return node


@pytest.fixture(scope="module")
def node_client() -> Path:
    """tests/polyglot with @grpc/grpc-js and @grpc/proto-loader installed from the npm registry."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm and node are not installed: the Node.js client cannot be built")
    if not (POLYGLOT / "node_modules" / "@grpc" / "proto-loader").is_dir():
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=POLYGLOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"npm install failed:\n{result.stdout}\n{result.stderr}"
    return POLYGLOT / "client.js"


async def run_node(
    node_client: Path,
    target: str,
    path: tuple[str, ...] = (),
    *,
    ca_file: Path | None = None,
    token: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run client.js against `target` under the namespace `path` (its default if empty)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("NESTKV_")}
    if ca_file is not None:
        env["NESTKV_CA_FILE"] = str(ca_file)
    if token is not None:
        env["NESTKV_TOKEN"] = token
    return await asyncio.to_thread(
        subprocess.run,
        ["node", str(node_client), target, os.pathsep.join(map(str, (PROTOS, GOOGLEAPIS))), *path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def check_round_trip(result: subprocess.CompletedProcess[str], store: GrpcStore) -> None:
    """Node read what Python put in `store` (from-python, 30 s) and wrote from-node (60 s) there,
    and the spread keys, which it read back."""
    assert result.returncode == 0, result.stdout + result.stderr
    seen: dict[str, Any] = json.loads(result.stdout)
    assert seen["found"] is True
    assert seen["value"] == "hello from python ✓"
    assert seen["ttl_found"] is True
    assert 28 <= seen["ttl_seconds"] <= 30
    assert seen["spread"] == [f"{key} from node" for key in SPREAD_KEYS]
    assert seen["other_namespace_found"] is False
    assert seen["invalid"]["code"] == 3  # INVALID_ARGUMENT
    assert "namespace segment is empty" in seen["invalid"]["details"]
    # What a program acts on, read from the google.rpc.Status trailer with googleapis' protos.
    assert seen["invalid"]["fields"] == {
        "code": 3,
        "reason": "INVALID_FIELD",
        "domain": "nestkv",
        "applied": "NOT_APPLIED",
        "bad_fields": ["path"],
    }
    assert await store.get("from-node") == "hello from node ✓".encode()
    left = await store.expires_in("from-node")
    assert left is not None
    assert 50 <= left <= 60  # whole seconds; on a busy machine seconds may pass between write and read
    for key in SPREAD_KEYS:
        assert await store.get(key) == f"{key} from node".encode()
        assert await store.expires_in(key) == -1  # no expiry
    await check_increments(seen, store)


async def check_increments(seen: dict[str, Any], store: GrpcStore) -> None:
    """Node's Increment calls counted (int64 as decimal strings, exact past 2**53), and the one on
    Python's text failed with FAILED_PRECONDITION and left it as it was."""
    first, second = seen["counted"]
    assert (first["value"], second["value"]) == ("5", "10")
    assert first["version_bytes"] == second["version_bytes"] == 16
    assert 58 <= second["expires_in_seconds"] <= 60  # the first increment's window, kept
    assert await store.get("counter-from-node") == b"10"
    left = await store.expires_in("counter-from-node")
    assert left is not None
    assert 50 <= left <= 60
    assert seen["big"] == {"value": str(BIG), "expires_in": None}  # no window asked: none
    assert await store.get("big-from-node") == str(BIG).encode()
    assert await store.increment("big-from-node", -BIG) == 0
    assert seen["not_integer"]["code"] == FAILED_PRECONDITION
    assert "not an integer" in seen["not_integer"]["details"]
    assert seen["not_integer"]["fields"]["reason"] == "NOT_AN_INTEGER"
    assert seen["not_integer"]["fields"]["applied"] == "NOT_APPLIED"
    # The same in a Pipeline, from store.proto alone: OperationError's enums.
    assert seen["operation_error"] == {
        "code": FAILED_PRECONDITION,
        "reason": "ERROR_REASON_NOT_AN_INTEGER",
        "applied": "APPLIED_NOT_APPLIED",
    }
    assert await store.get("from-python") == "hello from python ✓".encode()


async def test_node_reads_what_python_wrote_and_python_reads_what_node_wrote(
    server: ServerProcess, node_client: Path
) -> None:
    async with GrpcStore.with_client(server.target) as root:
        poly = root.with_namespace("poly")
        try:
            store = poly.with_namespace("glot")
            await store.set("from-python", "hello from python ✓", expires_in=30)
            await check_round_trip(await run_node(node_client, server.target), store)
        finally:
            await poly.delete_all()


async def keys_per_node(target: str, path: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """The cluster's members as `target` knows them, and the keys each node holds under `path`.

    From the raw Stats RPC: GrpcStore.stats() gives the totals, not `nodes`.
    """
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        topology: pb.TopologyResponse = await stub.Topology(pb.TopologyRequest(), timeout=10)
        stats: pb.StatsResponse = await stub.Stats(pb.StatsRequest(path=path), timeout=10)
    held = {node.node_id: node.namespace.keys for node in stats.nodes}
    assert stats.namespace.keys == sum(held.values())
    return [member.id for member in topology.members], held


async def test_node_through_one_node_of_a_cluster_reaches_each_keys_owner(
    cluster: ClusterProcesses, node_client: Path
) -> None:
    namespace = f"polyglot-{uuid.uuid4().hex}"
    path = (namespace, "glot")
    # Python routes each key to its owner itself; Node is given node-1's address and nothing else.
    async with GrpcStore.with_client(cluster.target("node-0")) as root:
        mine = root.with_namespace(namespace)
        try:
            store = mine.with_namespace("glot")
            await store.set("from-python", "hello from python ✓", expires_in=30)
            await check_round_trip(await run_node(node_client, cluster.target("node-1"), path), store)
            members, held = await keys_per_node(cluster.target("node-0"), path)
        finally:
            await mine.delete_all()
    assert sorted(members) == sorted(cluster.ports)
    placement = Placement(members)
    node_keys = ["from-node", *SPREAD_KEYS, *COUNTERS]
    # Node's keys belong to several nodes (node-1 forwarded those it does not own) ...
    assert len({placement.owner(path, key) for key in node_keys}) > 1
    # ... and each node holds exactly the keys it owns, Node's and Python's.
    owned = Counter(placement.owner(path, key) for key in ["from-python", *node_keys])
    assert held == {member: owned[member] for member in members}
    assert sum(1 for count in held.values() if count) > 1


async def test_node_over_tls_with_a_token_works_under_the_tokens_root(
    secure_server: SecureServer, pki: Pki, node_client: Path
) -> None:
    namespace = f"polyglot-{uuid.uuid4().hex}"
    # The token's root is ["tenant"]: this store's root, and where the server puts Node's paths.
    async with GrpcStore.with_client(
        secure_server.target, credentials=pki.credentials(), token=secure_server.token
    ) as root:
        mine = root.with_namespace(namespace)
        try:
            store = mine.with_namespace("glot")
            await store.set("from-python", "hello from python ✓", expires_in=30)
            result = await run_node(
                node_client,
                secure_server.target,
                (namespace, "glot"),
                ca_file=pki.ca.cert,
                token=secure_server.token,
            )
            # Node sent path [namespace, "glot"]: it read and wrote ["tenant", namespace, "glot"].
            await check_round_trip(result, store)
        finally:
            await mine.delete_all()
        assert await store.get("from-node") is None


@pytest.mark.parametrize(
    ("token", "reason"),
    [(None, "TOKEN_MISSING"), ("nkv_not-a-token-of-this-server", "TOKEN_INVALID")],
    ids=["no-token", "unknown-token"],
)
async def test_node_over_tls_without_a_valid_token_is_unauthenticated(
    secure_server: SecureServer, pki: Pki, node_client: Path, token: str | None, reason: str
) -> None:
    namespace = f"polyglot-{uuid.uuid4().hex}"
    result = await run_node(
        node_client, secure_server.target, (namespace, "glot"), ca_file=pki.ca.cert, token=token
    )
    assert result.returncode == CALL_FAILED, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["method"] == "Get"  # the first call: nothing after it ran
    assert error["code"] == UNAUTHENTICATED
    assert (error["fields"]["reason"], error["fields"]["applied"]) == (reason, "NOT_APPLIED")


def run_placement(node: str, vectors: Path) -> dict[str, Any]:
    """What placement.js computes for the paths, keys and member lists of `vectors`."""
    result = subprocess.run(
        [node, str(POLYGLOT / "placement.js"), str(vectors)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    computed: dict[str, Any] = json.loads(result.stdout)
    return computed


def test_a_node_placement_written_from_the_proto_computes_every_vector(node: str) -> None:
    expected = json.loads(VECTORS.read_text(encoding="utf-8"))
    computed = run_placement(node, VECTORS)
    assert computed["hash"] == expected["hash"] == "rendezvous-sha256-splitmix64"
    assert len(computed["vectors"]) == len(expected["vectors"]) > 0
    for mine, theirs in zip(computed["vectors"], expected["vectors"], strict=True):
        where = f"path {theirs['path']!r}, key {theirs['key']!r}"
        assert (mine["path"], mine["key"]) == (theirs["path"], theirs["key"]), where
        assert mine["encoding_hex"] == theirs["encoding_hex"], where
        assert mine["key_hash"] == theirs["key_hash"], where
        assert mine["scores"] == theirs["scores"], where
        assert mine["owners"] == theirs["owners"], where
        assert theirs["scores"], where  # compared something
        assert theirs["owners"], where
