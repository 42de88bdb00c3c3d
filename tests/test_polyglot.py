"""A Node.js client built from the .proto alone talks to the server, both ways."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nestkv.client import GrpcStore
from tests.serverproc import ServerProcess

POLYGLOT = Path(__file__).parent / "polyglot"
PROTOS = Path(__file__).parent.parent / "protos"


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


async def test_node_reads_what_python_wrote_and_python_reads_what_node_wrote(
    server: ServerProcess, node_client: Path
) -> None:
    async with GrpcStore.with_client(server.target) as root:
        store = root.with_namespace("poly").with_namespace("glot")
        await store.set("from-python", "hello from python ✓", expires_in=30)
        result = await asyncio.to_thread(
            subprocess.run,
            ["node", str(node_client), server.target, str(PROTOS)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["found"] is True
        assert seen["value"] == "hello from python ✓"
        assert seen["ttl_found"] is True
        assert 28 <= seen["ttl_seconds"] <= 30
        assert seen["other_namespace_found"] is False
        assert seen["invalid"]["code"] == 3  # INVALID_ARGUMENT
        assert "namespace segment is empty" in seen["invalid"]["details"]
        assert await store.get("from-node") == "hello from node ✓".encode()
        assert await store.expires_in("from-node") == 60
