"""A Node.js client built from the .proto alone talks to the server, both ways: in plaintext,
and over TLS with a token sent as grpc-js call credentials."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from nestkv.client import GrpcStore
from tests.conftest import SecureServer
from tests.pki import Pki
from tests.serverproc import ServerProcess

POLYGLOT = Path(__file__).parent / "polyglot"
PROTOS = Path(__file__).parent.parent / "protos"
CALL_FAILED = 2
"""client.js's exit code when an RPC fails with a gRPC status (it prints {"error": ...})."""
UNAUTHENTICATED = 16


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
        ["node", str(node_client), target, str(PROTOS), *path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def check_round_trip(result: subprocess.CompletedProcess[str], store: GrpcStore) -> None:
    """Node read what Python put in `store` (from-python, 30 s) and wrote from-node (60 s) there."""
    assert result.returncode == 0, result.stdout + result.stderr
    seen: dict[str, Any] = json.loads(result.stdout)
    assert seen["found"] is True
    assert seen["value"] == "hello from python ✓"
    assert seen["ttl_found"] is True
    assert 28 <= seen["ttl_seconds"] <= 30
    assert seen["other_namespace_found"] is False
    assert seen["invalid"]["code"] == 3  # INVALID_ARGUMENT
    assert "namespace segment is empty" in seen["invalid"]["details"]
    assert await store.get("from-node") == "hello from node ✓".encode()
    assert await store.expires_in("from-node") == 60


async def test_node_reads_what_python_wrote_and_python_reads_what_node_wrote(
    server: ServerProcess, node_client: Path
) -> None:
    async with GrpcStore.with_client(server.target) as root:
        store = root.with_namespace("poly").with_namespace("glot")
        await store.set("from-python", "hello from python ✓", expires_in=30)
        await check_round_trip(await run_node(node_client, server.target), store)


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
    ("token", "details"),
    [
        (None, "this server requires a token"),
        ("nkv_not-a-token-of-this-server", "the token is not valid on this server"),
    ],
    ids=["no-token", "unknown-token"],
)
async def test_node_over_tls_without_a_valid_token_is_unauthenticated(
    secure_server: SecureServer, pki: Pki, node_client: Path, token: str | None, details: str
) -> None:
    namespace = f"polyglot-{uuid.uuid4().hex}"
    result = await run_node(
        node_client, secure_server.target, (namespace, "glot"), ca_file=pki.ca.cert, token=token
    )
    assert result.returncode == CALL_FAILED, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["method"] == "Get"  # the first call: nothing after it ran
    assert error["code"] == UNAUTHENTICATED
    assert details in error["details"]
