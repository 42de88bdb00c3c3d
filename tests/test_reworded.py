"""What clients do after a failure comes from fields, never from words: part of the suite runs again
with every message a nestkv server sends reworded (tests/reword/sitecustomize.py), and passes.

The part chosen is where a client acts on a failure: the client and its pipeline (resending what
was not applied, failing what is unknown), the cluster's refusals and forwarding with replicas, and
increments counted once under the fault-injection harness. Tests marked `words` check what a
message says to people, and are left out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.serverproc import ServerProcess

ROOT = Path(__file__).parents[1]
REWORD = ROOT / "tests" / "reword"
ACTING_ON_FAILURES = [
    "tests/client",
    "tests/wire",
    "tests/server/cluster/test_replicas.py",
    "tests/server/cluster/test_router.py",
    "tests/test_faults.py::test_faults_one_node_at_a_time_count_every_increment_once",
]


def reworded_env() -> dict[str, str]:
    """This process's environment with tests/reword first on PYTHONPATH."""
    paths = [str(REWORD), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def test_a_server_started_so_rewords_its_messages_and_keeps_its_fields() -> None:
    with ServerProcess(env={"PYTHONPATH": reworded_env()["PYTHONPATH"]}) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Set(pb.SetRequest(path=["a", ""], key="k"))
            operation = pb.Operation(set=pb.SetRequest(path=[""], key="k"))
            call = stub.Pipeline(iter([pb.PipelineRequest(id=1, operations=[operation])]))
            response = await call.read()
    assert caught.value.details() == "reworded: InvalidArgument"
    error = response.results[0].error
    assert (error.message, error.reason, error.applied) == (
        "reworded: InvalidArgument",
        pb.ERROR_REASON_INVALID_FIELD,
        pb.APPLIED_NOT_APPLIED,
    )


def test_the_clients_tests_pass_with_every_server_message_reworded() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not words",
            *ACTING_ON_FAILURES,
        ],
        cwd=ROOT,
        env=reworded_env(),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
