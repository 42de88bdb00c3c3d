"""The auth file and the grants it gives, driven directly; `nestkv-server token new` as a subprocess."""

from __future__ import annotations

import hashlib
import re
import subprocess
import tomllib
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nestkv.server.__main__ import parse_config
from nestkv.server.errors import InvalidArgument, PermissionDenied
from nestkv.server.limits import Limits
from nestkv.server.metrics import Denials
from nestkv.server.security import Grant, SecurityConfigError, digest, load_tokens, toml_entry
from nestkv.server.storage import NamespacedStorage
from nestkv.v1 import store_pb2 as pb
from tests.inprocess import local_servicer
from tests.serverproc import ServerProcess, server_command

DIGEST = "ab" * 32


def entry(name: str = "t", sha256: str = DIGEST, path: str = '["a"]', access: str = "read") -> str:
    return f'[[tokens]]\nname = "{name}"\nsha256 = "{sha256}"\npath = {path}\naccess = "{access}"\n'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[tokens]\n", "(at line 1, column 9)"),
        (entry() + "role = 1\n", "unknown field `role`"),
        (entry(sha256="AB" * 32), "$.tokens[0].sha256"),
        (entry(sha256="ab"), "$.tokens[0].sha256"),
        (entry(access="admin"), "'admin'"),
        (entry(name=""), "$.tokens[0].name"),
        (entry() + "\n" + entry(sha256="cd" * 32), "token 't' (entry 2): the name is taken"),
        (entry() + "\n" + entry(name="u"), "token 'u' (entry 2): the same sha256"),
        (entry(path='["a", ""]'), "token 't' (entry 1): path: namespace segment is empty"),
        (entry(path=str(["s"] * 33).replace("'", '"')), "path: path has 33 segments; the limit is 32"),
        (entry() + "max_bytes = 0\n", "$.tokens[0].max_bytes"),
        (entry() + 'max_bytes = "1M"\n', "$.tokens[0].max_bytes"),
        (
            entry() + "max_bytes = 1000\n\n" + entry(name="u", sha256="cd" * 32) + "max_bytes = 2000\n",
            "token 'u' (entry 2): max_bytes 2000 differs from an earlier token's with the same path (1000)",
        ),
    ],
)
def test_an_auth_file_that_cannot_be_used_is_refused_with_the_reason(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(SecurityConfigError, match="auth file") as raised:
        load_tokens(str(path), Limits(), None)
    assert problem in str(raised.value)
    assert str(path) in str(raised.value)


def test_a_missing_auth_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match=r"cannot read auth file .*missing\.toml"):
        load_tokens(str(tmp_path / "missing.toml"), Limits(), None)


segments = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@given(name=segments, path=st.lists(segments, max_size=4), access=st.sampled_from(["read", "readwrite"]))
def test_toml_entry_reads_back_as_written(name: str, path: list[str], access: str) -> None:
    """Names and segments with quotes, backslashes, control characters or DEL survive the TOML."""
    parsed = tomllib.loads(toml_entry(name, DIGEST, path, access))
    assert parsed == {"tokens": [{"name": name, "sha256": DIGEST, "path": path, "access": access}]}


def test_scope_roots_the_path_and_checks_it_as_the_caller_sent_it() -> None:
    grant = Grant("t", ("tenant", "x"), True, Limits(max_depth=3))
    request = pb.SetRequest(path=["a", "b", "c"], key="k")
    grant.scope("set", request)
    assert list(request.path) == ["tenant", "x", "a", "b", "c"]
    with pytest.raises(InvalidArgument, match="path has 4 segments; the limit is 3"):
        grant.scope("get", pb.GetRequest(path=["a", "b", "c", "d"], key="k"))
    with pytest.raises(InvalidArgument, match="namespace segment is empty"):
        grant.scope("exists", pb.ExistsRequest(path=["a", ""], key="k"))


@pytest.mark.parametrize(
    ("kind", "request_message"),
    [
        ("set", pb.SetRequest(key="k")),
        ("delete", pb.DeleteRequest(key="k")),
        ("delete_all", pb.DeleteAllRequest()),
        ("get", pb.GetRequest(key="k", renew_for={"seconds": 5})),
    ],
)
def test_a_read_grant_refuses_every_change_and_counts_it(kind: str, request_message: object) -> None:
    denials = Denials()
    grant = Grant("reader", ("tenant",), False, Limits(), denials)
    with pytest.raises(PermissionDenied, match=r"token .reader. has read access; .* needs readwrite"):
        grant.scope(kind, request_message)
    assert denials.counts == {("reader", "read_only"): 1}


@pytest.mark.parametrize(
    ("kind", "request_message"),
    [
        ("get", pb.GetRequest(key="k")),
        ("exists", pb.ExistsRequest(key="k")),
        ("expires_in", pb.ExpiresInRequest(key="k")),
        ("stats", pb.StatsRequest()),
    ],
)
def test_a_read_grant_allows_every_read(kind: str, request_message: pb.GetRequest) -> None:
    Grant("reader", ("tenant",), False, Limits()).scope(kind, request_message)
    assert list(request_message.path) == ["tenant"]


def token_new(*args: str) -> subprocess.CompletedProcess[str]:
    return server_command("token", "new", *args)


def test_token_new_prints_the_token_then_the_entry_to_append(tmp_path: Path) -> None:
    auth_file = tmp_path / "tokens.toml"
    tokens = []
    for name, path in (("tenant-a", ["--path", "tenant-a"]), ("ops", ["--whole-store"])):
        minted = token_new("--name", name, *path, "--access", "readwrite")
        assert minted.returncode == 0, minted.stderr
        token, rest = minted.stdout.split("\n", 1)
        tokens.append(token)
        with auth_file.open("a") as file:  # what `| tail -n +2 >> tokens.toml` appends
            file.write(rest)
    assert tokens[0] != tokens[1]
    for token in tokens:
        assert token.startswith("nkv_")
        assert len(token) - len("nkv_") >= 43  # 32 random bytes, base64url: 256 bits
        assert token not in auth_file.read_text()
    index, quotas = load_tokens(str(auth_file), Limits(), None)
    assert quotas == {}
    grants = {grant.name: (full, grant) for bucket in index.values() for full, grant in bucket}
    assert grants["tenant-a"][0] == hashlib.sha256(tokens[0].encode()).digest()
    assert grants["tenant-a"][0].hex() == digest(tokens[0])
    assert (grants["tenant-a"][1].root, grants["tenant-a"][1].writes) == (("tenant-a",), True)
    assert (grants["ops"][1].root, grants["ops"][1].writes) == ((), True)


def test_token_new_gives_a_quota_to_its_root_and_the_auth_file_keeps_it(tmp_path: Path) -> None:
    minted = token_new("--name", "quoted", "--path", "q", "--access", "readwrite", "--max-bytes", "64K")
    assert minted.returncode == 0, minted.stderr
    _, rest = minted.stdout.split("\n", 1)
    assert rest.endswith('access = "readwrite"\nmax_bytes = 65536\n')
    auth_file = tmp_path / "tokens.toml"
    auth_file.write_text(rest + "\n" + entry(name="other", path='["q"]'))  # another token of ["q"], no quota
    _, quotas = load_tokens(str(auth_file), Limits(), None)
    assert quotas == {("q",): 65536}
    refused = token_new("--name", "x", "--path", "q", "--max-bytes", "lots")
    assert refused.returncode == 2
    assert "'lots' is not a byte count" in refused.stderr


def test_token_new_defaults_to_read_and_needs_a_place(tmp_path: Path) -> None:
    minted = token_new("--name", "reader", "--path", "a", "--path", "b/c")
    assert minted.returncode == 0
    assert minted.stdout.split("\n", 2)[2] == entry(
        "reader", digest(minted.stdout.split("\n")[0]), '["a", "b/c"]'
    )
    nowhere = token_new("--name", "x")
    assert nowhere.returncode == 2
    assert "one of the arguments --path --whole-store is required" in nowhere.stderr
    empty = token_new("--name", "x", "--path", "")
    assert empty.returncode == 2
    assert "namespace segment is empty" in empty.stderr


def test_an_operation_no_one_listed_as_a_read_is_refused_to_a_read_grant() -> None:
    """Access is an allow list: an operation added later is not a read until it is listed as one."""
    with pytest.raises(PermissionDenied):
        Grant("reader", (), False, Limits()).scope("compare_and_set", pb.SetRequest(key="k"))


async def test_a_full_store_tells_a_scoped_caller_nothing_of_the_memory_others_use() -> None:
    storage = NamespacedStorage(max_memory=10_000)
    servicer = local_servicer(storage)
    await servicer.run_batch(
        pb.PipelineRequest(operations=[pb.Operation(set=pb.SetRequest(key="other", value=b"x" * 6_000))])
    )
    write = pb.PipelineRequest(operations=[pb.Operation(set=pb.SetRequest(key="k", value=b"y" * 6_000))])
    [unscoped] = await servicer.run_batch(write)
    assert "used memory" in unscoped.results[0].error.message  # the operator's view: every figure
    write = pb.PipelineRequest(operations=[pb.Operation(set=pb.SetRequest(key="k", value=b"y" * 6_000))])
    [scoped] = await servicer.run_batch(write, Grant("tenant", ("tenant",), True, Limits()))
    error = scoped.results[0].error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert error.message == "the store is full: nothing may be evicted to make room for this write"
    # Not even the bytes the write needs: tried size after size, they would tell what is free.
    assert not re.search(r"\d", error.message)


def test_metrics_are_served_on_loopback_unless_told_otherwise() -> None:
    """/metrics has no tokens: the store served on another address does not take the metrics along."""
    config = parse_config(["--host", "0.0.0.0", "--insecure", "--metrics-port", "0"])
    assert (config.host, config.metrics_host) == ("0.0.0.0", "127.0.0.1")
    with ServerProcess("--host", "127.0.0.2", "--metrics-port", "0") as server:
        assert "nestkv serving on 127.0.0.2:" in server.log[-1]
        assert ", metrics at http://127.0.0.1:" in server.log[-1]
    with ServerProcess("--metrics-port", "0", "--metrics-host", "127.0.0.3") as server:
        assert ", metrics at http://127.0.0.3:" in server.log[-1]
        assert not any("metrics on" in line for line in server.log)


def test_metrics_on_a_non_loopback_address_are_warned_of_at_start() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the warning comes before the bind fails.
    done = server_command("--port", "0", "--metrics-port", "0", "--metrics-host", "192.0.2.1")
    assert "metrics on 192.0.2.1 are plain HTTP with no token" in done.stderr
    assert "cannot serve metrics on 192.0.2.1" in done.stderr
