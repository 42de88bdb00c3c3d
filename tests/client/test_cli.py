"""The `nestkv` command, run as a subprocess against a real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess

SCRIPT = Path(sys.executable).parent / "nestkv"


def nestkv(
    *args: str, target: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nestkv.client", "--target", target, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with ServerProcess() as server:
        yield server.target


def test_set_get_exists_ttl_delete_round_trip(target: str) -> None:
    assert nestkv("-n", "app", "set", "greeting", "héllo", target=target).returncode == 0
    got = nestkv("-n", "app", "get", "greeting", target=target)
    assert (got.returncode, got.stdout, got.stderr) == (0, "héllo".encode(), b"")
    assert nestkv("-n", "app", "exists", "greeting", target=target).stdout == b"true\n"
    assert nestkv("-n", "app", "ttl", "greeting", target=target).stdout == b"-1\n"
    assert nestkv("-n", "app", "set", "brief", "v", "--ttl", "100", target=target).returncode == 0
    left = nestkv("-n", "app", "ttl", "brief", target=target)
    # Seconds left, rounded to the nearest: starting a process between the two calls takes up
    # to a second or so on a loaded machine.
    assert (left.returncode, left.stdout.endswith(b"\n")) == (0, True)
    assert 98 <= int(left.stdout) <= 100
    assert nestkv("-n", "app", "delete", "greeting", target=target).returncode == 0
    missing = nestkv("-n", "app", "get", "greeting", target=target)
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, b"", b"")
    not_there = nestkv("-n", "app", "exists", "greeting", target=target)
    assert (not_there.returncode, not_there.stdout) == (1, b"false\n")
    assert nestkv("-n", "app", "ttl", "greeting", target=target).returncode == 1


def test_values_from_stdin_are_binary_safe(target: str) -> None:
    value = bytes(range(256)) * 4 + b"\n\r\x00"
    assert nestkv("set", "blob", "-", stdin=value, target=target).returncode == 0
    assert nestkv("get", "blob", target=target).stdout == value


def test_segments_are_structural_and_may_hold_slashes(target: str) -> None:
    assert nestkv("-n", "a/b", "set", "k", "slash", target=target).returncode == 0
    assert nestkv("-n", "a", "-n", "b", "set", "k", "nested", target=target).returncode == 0
    assert nestkv("-n", "a/b", "get", "k", target=target).stdout == b"slash"
    assert nestkv("-n", "a", "-n", "b", "get", "k", target=target).stdout == b"nested"
    assert nestkv("-n", "a", "delete-all", target=target).returncode == 0
    assert nestkv("-n", "a", "-n", "b", "get", "k", target=target).returncode == 1
    assert nestkv("-n", "a/b", "get", "k", target=target).stdout == b"slash"


def test_stats_as_a_table_and_as_json(target: str) -> None:
    nestkv("-n", "counted", "set", "one", "1", target=target)
    nestkv("-n", "counted", "set", "two", "2", "--ttl", "60", target=target)
    table = nestkv("-n", "counted", "stats", target=target)
    assert table.returncode == 0
    assert b"namespace                counted" in table.stdout
    assert b"keys                     2" in table.stdout
    figures = json.loads(nestkv("-n", "counted", "stats", "--json", target=target).stdout)
    assert figures["path"] == ["counted"]
    assert figures["namespace"]["keys"] == 2
    assert figures["namespace"]["expiring_keys"] == 1
    assert figures["server"]["keys"] >= 2


def test_ping_and_the_target_from_the_environment(target: str) -> None:
    env = {**os.environ, "NESTKV_TARGET": target}
    done = subprocess.run([str(SCRIPT), "ping"], capture_output=True, timeout=60, check=False, env=env)
    assert (done.returncode, done.stdout) == (0, b"SERVING\n")


@pytest.mark.words
def test_errors_are_one_line_with_exit_code_2_and_no_traceback(target: str) -> None:
    with ServerProcess() as gone:
        nowhere = gone.target
    unreachable = nestkv("--timeout", "2", "get", "k", target=nowhere)
    assert unreachable.returncode == 2
    assert unreachable.stderr.decode().count("\n") == 1
    assert b"UNAVAILABLE" in unreachable.stderr
    assert b"Traceback" not in unreachable.stderr
    ping = nestkv("ping", target=nowhere)
    assert ping.returncode == 1
    too_long = nestkv("get", "k" * 5000, target=target)
    assert too_long.returncode == 2
    assert (
        too_long.stderr
        == b"nestkv: "
        + target.encode()
        + b": INVALID_ARGUMENT: key is 5000 bytes; the limit is 4096 (max_key_bytes)\n"
    )
    bad_ttl = nestkv("set", "k", "v", "--ttl", "0", target=target)
    assert (bad_ttl.returncode, bad_ttl.stderr) == (
        2,
        b"nestkv: --ttl must be a positive number of seconds, got 0.0\n",
    )
    empty_segment = nestkv("-n", "", "get", "k", target=target)
    assert (empty_segment.returncode, empty_segment.stderr) == (
        2,
        b"nestkv: namespace must be a non-empty string\n",
    )


def test_closed_or_broken_standard_streams_are_errors_not_tracebacks(target: str) -> None:
    nestkv("set", "big", "-", stdin=b"v" * 1_000_000, target=target)
    command = [sys.executable, "-m", "nestkv.client", "--target", target]
    closed_stdin = subprocess.run(
        [*command, "set", "k", "-"],
        stdin=None,
        capture_output=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(0),
    )
    assert (closed_stdin.returncode, closed_stdin.stderr) == (
        2,
        b"nestkv: standard input is closed; nothing to read the value from\n",
    )
    closed_stdout = subprocess.run(
        [*command, "get", "big"],
        capture_output=False,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert (closed_stdout.returncode, closed_stdout.stderr) == (
        2,
        b"nestkv: standard output is closed; nowhere to write\n",
    )
    with open("/dev/full", "wb") as full:
        no_space = subprocess.run(
            [*command, "get", "big"], stdout=full, stderr=subprocess.PIPE, timeout=60, check=False
        )
    assert no_space.returncode == 2
    assert no_space.stderr.startswith(b"nestkv: cannot write to standard output: No space left")
    assert no_space.stderr.count(b"\n") == 1


def test_usage_errors_are_one_line(target: str) -> None:
    for args in ([], ["frobnicate"], ["get"], ["--timeout", "-1", "get", "k"]):
        done = nestkv(*args, target=target)
        assert done.returncode == 2, args
        assert done.stderr.count(b"\n") == 1, (args, done.stderr)
        assert b"Traceback" not in done.stderr


def test_values_larger_than_the_default_limit_with_max_value_bytes() -> None:
    value = os.urandom(17 * 1024 * 1024)
    with ServerProcess("--max-value-bytes", str(32 * 1024 * 1024)) as server:
        limit = ["--max-value-bytes", str(32 * 1024 * 1024)]
        refused = nestkv("set", "big", "-", stdin=value, target=server.target)
        assert refused.returncode == 2
        assert b"the limit is 16777216 (max_value_bytes)" in refused.stderr
        assert nestkv(*limit, "set", "big", "-", stdin=value, target=server.target).returncode == 0
        assert nestkv(*limit, "get", "big", target=server.target).stdout == value


def test_a_token_to_a_remote_server_without_tls_is_refused_in_the_shell_s_words() -> None:
    refused = nestkv("--token", "secret", "get", "k", target="example.com:50051")
    assert refused.returncode == 2
    assert refused.stderr.decode().count("\n") == 1
    assert b"'example.com:50051' is neither: add --tls (the system's CAs) or --ca FILE" in refused.stderr
    assert b"credentials=" not in refused.stderr  # no Python argument to a shell user
