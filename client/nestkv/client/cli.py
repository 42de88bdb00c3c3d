"""The `nestkv` command (also `python -m nestkv.client`): the store from a shell, as redis-cli and etcdctl.

    nestkv [--target HOST:PORT] [--ca FILE] [--cert FILE --key FILE] [--token TOKEN]
           [-n SEGMENT]... COMMAND
      get KEY                          the value to stdout, byte for byte; exit 1 if missing
      set KEY VALUE|- [--ttl SECONDS]  '-' reads the value from stdin (binary safe)
      delete KEY | exists KEY | ttl KEY | delete-all
      stats [--json]                   the Stats RPC, as a table or JSON
      ping                             health check; exit 0 serving, 1 otherwise

Exit codes: 0 done (for exists: the key exists), 1 a missing key, a key that
does not exist or a server not serving, 2 an error (of the server, the
arguments or the standard streams), named in one line on stderr, never a
traceback. argparse is enough here: eight commands of one or two arguments
each do not need a CLI library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc
import msgspec

from nestkv.client.stats import Stats
from nestkv.client.store import DEFAULT_TARGET, DEFAULT_TIMEOUT, GrpcStore
from nestkv.wire.channel import DEFAULT_MAX_VALUE_BYTES, plaintext_token_refused, seed_targets
from nestkv.wire.errors import StoreError

MISSING = 1
FAILED = 2


class CommandError(Exception):
    """A problem with the command itself or its standard streams; the message says which."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors too are one line (argparse would print the usage first)."""
        self.exit(FAILED, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="nestkv", description="Talk to a nestkv server.")
    top.add_argument(
        "--target",
        default=os.environ.get("NESTKV_TARGET", DEFAULT_TARGET),
        help="HOST:PORT of the server (default: $NESTKV_TARGET or %(default)s)",
    )
    top.add_argument(
        "-n",
        "--namespace",
        dest="path",
        action="append",
        default=[],
        metavar="SEGMENT",
        help="one namespace segment, repeated for each level (a segment may hold '/')",
    )
    top.add_argument(
        "--tls", action="store_true", help="connect over TLS, trusting the system's CA certificates"
    )
    top.add_argument(
        "--ca", dest="tls_ca", metavar="FILE", help="PEM CA certificates to trust: connect over TLS"
    )
    top.add_argument(
        "--cert", dest="tls_cert", metavar="FILE", help="PEM client certificate, for mutual TLS (with --key)"
    )
    top.add_argument("--key", dest="tls_key", metavar="FILE", help="PEM private key of --cert")
    top.add_argument(
        "--token",
        default=os.environ.get("NESTKV_TOKEN"),
        help="token for a server with --auth-file (default: $NESTKV_TOKEN, which other users cannot "
        "read in the process list as they can arguments); sent only over TLS, or in plaintext to a "
        "loopback address",
    )
    top.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (default: %(default)s)")
    top.add_argument(
        "--max-value-bytes",
        type=int,
        default=DEFAULT_MAX_VALUE_BYTES,
        help="largest value to send or receive; match the server's flag (default: %(default)s)",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    commands.add_parser("get", help="print the value of KEY").add_argument("key")
    setting = commands.add_parser("set", help="store VALUE ('-': standard input) under KEY")
    setting.add_argument("key")
    setting.add_argument("value")
    setting.add_argument("--ttl", type=float, help="seconds until the key expires (default: never)")
    commands.add_parser("delete", help="remove KEY").add_argument("key")
    commands.add_parser("exists", help="whether KEY holds a value (exit 1 if not)").add_argument("key")
    commands.add_parser("ttl", help="seconds KEY has left; -1: no expiry").add_argument("key")
    commands.add_parser("delete-all", help="remove every key of the namespace and below")
    commands.add_parser("stats", help="figures of the namespace and the server").add_argument(
        "--json", action="store_true", help="as one JSON object"
    )
    commands.add_parser("ping", help="health check: exit 0 if the server is serving")
    return top


async def run(args: argparse.Namespace) -> int:
    """Run one command; its exit code. StoreError and ValueError propagate to `main`."""
    if not args.timeout > 0:
        raise CommandError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    credentials = channel_credentials(args)
    if args.token and credentials is None:
        refused = plaintext_token_refused(seed_targets(args.target))
        if refused:
            raise CommandError(f"{refused}: add --tls (the system's CAs) or --ca FILE")
    if args.command == "ping":
        return await ping(args.target, args.timeout, credentials)
    async with GrpcStore.with_client(
        args.target,
        timeout=args.timeout,
        max_value_bytes=args.max_value_bytes,
        credentials=credentials,
        token=args.token or None,
    ) as root:
        store = root
        for segment in args.path:
            store = store.with_namespace(segment)
        match args.command:
            case "get":
                value = await store.get(args.key)
                if value is None:
                    return MISSING
                _write(value)
            case "set":
                value = _read_stdin() if args.value == "-" else os.fsencode(args.value)
                ttl = None if args.ttl is None else _seconds(args.ttl)
                await store.set(args.key, value, expires_in=ttl)  # type: ignore[arg-type]
            case "delete":
                await store.delete(args.key)
            case "exists":
                found = await store.exists(args.key)
                _write(b"true\n" if found else b"false\n")
                return 0 if found else MISSING
            case "ttl":
                left = await store.expires_in(args.key)
                if left is None:
                    return MISSING
                _write(f"{left}\n".encode())
            case "delete-all":
                await store.delete_all()
            case "stats":
                stats = await store.stats()
                text = json.dumps(msgspec.to_builtins(stats)) if args.json else stats_table(stats)
                _write(f"{text}\n".encode())
    return 0


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls, --ca, --cert and --key; None (plaintext) without any of them."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CommandError("--cert and --key go together: give both, or neither")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None

    def read(path: str | None, flag: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise CommandError(f"cannot read {flag} {path}: {error.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca, "--ca"),
        private_key=read(args.tls_key, "--key"),
        certificate_chain=read(args.tls_cert, "--cert"),
    )


def _read_stdin() -> bytes:
    if sys.stdin is None:
        raise CommandError("standard input is closed; nothing to read the value from")
    return sys.stdin.buffer.read()


def _write(data: bytes) -> None:
    """Write to standard output and flush, so that a failure to write is seen here."""
    if sys.stdout is None:
        raise CommandError("standard output is closed; nowhere to write")
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except OSError as error:
        # Nothing more will go out: keep Python from failing again at exit on the same stream.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise CommandError(f"cannot write to standard output: {error.strerror or error}") from None


def _seconds(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError(f"--ttl must be a positive number of seconds, got {ttl}")
    return ttl


def stats_table(stats: Stats) -> str:
    namespace, server = stats.namespace, stats.server
    rows = [
        ("namespace", "/".join(stats.path) or "(root)"),
        ("keys", f"{namespace.keys:,}"),
        ("bytes", f"{namespace.bytes:,}"),
        ("expiring keys", f"{namespace.expiring_keys:,}"),
        ("child namespaces", f"{namespace.child_namespaces:,}"),
        ("server keys", f"{server.keys:,}"),
        ("server memory bytes", f"{server.memory_bytes:,}"),
        ("server max memory bytes", f"{server.max_memory_bytes:,}" if server.max_memory_bytes else "none"),
        ("evictions", f"{server.evictions:,}"),
        ("expired keys", f"{server.expired_keys:,}"),
        ("uptime seconds", f"{server.uptime_seconds:,.1f}"),
        ("version", server.version),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


async def ping(target: str, seconds: float, credentials: grpc.ChannelCredentials | None = None) -> int:
    """Ask grpc.health.v1 whether the server is serving: 0 if so, MISSING otherwise (no token needed)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=seconds, wait_for_ready=False
            )
        except grpc.aio.AioRpcError as error:
            _write(f"not serving: {target}: {error.code().name}: {error.details()}\n".encode())
            return MISSING
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    _write(f"{status}\n".encode())
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else MISSING


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = asyncio.run(run(args))
    except StoreError as error:
        hint = ""
        if error.code == "UNAVAILABLE" and not (args.tls or args.tls_ca or args.tls_cert):
            hint = " (if the server serves TLS, connect with --ca FILE or --tls)"
        code = _fail(f"{args.target}: {error}{hint}")
    except (CommandError, ValueError, TypeError) as error:
        code = _fail(str(error))
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


def _fail(message: str) -> int:
    if sys.stderr is not None:
        print(f"nestkv: {message}", file=sys.stderr)
    return FAILED
