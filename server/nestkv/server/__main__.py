"""Command line: `python -m nestkv.server [flags]` or `nestkv-server`; flags map onto ServerConfig."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from nestkv.server.app import serve
from nestkv.server.config import ServerConfig
from nestkv.server.errors import InvalidArgument
from nestkv.server.limits import Limits
from nestkv.server.security import TokenEntry, digest, new_token, toml_entry

_HELP = {
    "host": "address to listen on (default: %(default)s)",
    "port": "TCP port; 0 picks a free one, named in the ready line (default: %(default)s)",
    "shutdown_grace": "seconds in-flight calls get to finish on SIGINT/SIGTERM (default: %(default)s)",
    "reap_interval": "seconds between rounds of active expiry (default: %(default)s)",
    "log_level": "DEBUG, INFO, WARNING or ERROR (default: %(default)s)",
    "event_loop": "auto (uvloop if installed), uvloop or asyncio (default: %(default)s)",
    "data_dir": "directory for the log and snapshots; unset: in memory only (default: none)",
    "fsync": "fsync the log: always (before answering), everysec or no (default: %(default)s)",
    "snapshot_interval": "seconds between snapshots, if anything changed (default: %(default)s)",
    "max_memory": "bound on stored data, bytes with optional K/M/G suffix; 0: none (default: %(default)s)",
    "eviction_policy": "over --max-memory: noeviction (writes fail), allkeys-lru, volatile-lru or "
    "volatile-ttl (default: %(default)s)",
    "max_concurrent_streams": "calls one connection may have open at once (default: %(default)s)",
    "metrics_port": "serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port "
    "(default: off)",
    "metrics_host": "address to serve the metrics on: plain HTTP, no token, so loopback unless set "
    "(0.0.0.0 for a Prometheus on another machine) (default: %(default)s)",
    "log_format": "text, or json: one JSON object a line (default: %(default)s)",
    "tls_cert": "PEM certificate chain: serve TLS only (with --tls-key); reloaded on SIGHUP",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA that client certificates must chain to: mutual TLS",
    "auth_file": "TOML file of tokens, each confined to a namespace; calls then need one "
    "(see `nestkv-server token new`); reloaded on SIGHUP",
    "insecure": "serve a non-loopback --host with neither client certificates nor tokens, on purpose",
    "node_id": "this node's id in --cluster (default: the host name, a StatefulSet's pod name)",
    "cluster": "the members: ID=HOST:PORT,... or @FILE with one ID=HOST:PORT a line, re-read when it "
    "changes; every node gets the same list, itself included (default: a cluster of one)",
    "cluster_name": "the cluster's DNS name, such as its headless Service's nestkv.NAMESPACE.svc: under "
    "mutual TLS a peer's certificate must carry the DNS name NODE_ID.CLUSTER_NAME (required then)",
    "health_port": "also serve grpc.health.v1 alone, in plaintext, on this port: for Kubernetes' gRPC "
    "probes, which do not speak TLS (default: off)",
    "tombstone_age": "in a cluster, seconds a delete is remembered so that an older copy does not bring "
    "the key back; a data directory away longer is refused (default: %(default)s)",
    "max_tombstones": "in a cluster, most deletes remembered; over it a delete of a key not held here is "
    "refused (default: %(default)s)",
    "replicas": "in a cluster, copies kept of every key (1-5): 2 or more fail over when a node is down "
    "(default: %(default)s)",
    "min_copies": "copies a write is stored on before it is answered, stand-ins included; 0: "
    "min(--replicas, 2) (default: %(default)s)",
    "drain_timeout": "on SIGTERM, seconds to hand this node's keys to the other members before exiting "
    "(default: %(default)s)",
    "max_key_bytes": "largest key in bytes of UTF-8 (default: %(default)s)",
    "max_value_bytes": "largest value in bytes; gRPC message limits follow it (default: %(default)s)",
    "max_depth": "most namespace segments in a path (default: %(default)s)",
    "max_segment_bytes": "largest namespace segment in bytes of UTF-8 (default: %(default)s)",
    "max_batch_operations": "most operations in one Pipeline batch, at least 512; larger ones are "
    "refused with INVALID_ARGUMENT (default: %(default)s)",
}


_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def byte_count(text: str) -> int:
    """`512`, `64K`, `100M`, `2G` (powers of 1024, as Redis's maxmemory)."""
    number, suffix = text.strip(), ""
    if number[-1:].upper() in _SUFFIXES:
        number, suffix = number[:-1], number[-1:].upper()
    try:
        return int(number) * _SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte count such as 512, 64K, 100M or 2G"
        ) from None


_TYPES: dict[str, Callable[[str], Any]] = {"max_memory": byte_count, "metrics_port": int, "health_port": int}


def _add_flags(parser: argparse.ArgumentParser, struct: type[msgspec.Struct], skip: str = "") -> None:
    for field in msgspec.structs.fields(struct):
        if field.name == skip:
            continue
        if field.default is False:
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                action="store_true",
                help=_HELP[field.name],
            )
            continue
        choices = typing.get_args(field.type) if typing.get_origin(field.type) is typing.Literal else None
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_TYPES.get(field.name, type(field.default)),
            default=field.default,
            choices=choices,  # a value not in them is refused naming them all
            help=_HELP[field.name],
        )


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse flags into a ServerConfig; an invalid value exits with a message naming the flag."""
    parser = argparse.ArgumentParser(
        prog="nestkv-server",
        description="Serve the nestkv namespaced key/value store over gRPC.",
        allow_abbrev=False,  # a misspelt flag in a manifest fails, not silently means another
    )
    _add_flags(parser, ServerConfig, skip="limits")
    _add_flags(parser, Limits)
    args = vars(parser.parse_args(argv))
    limit_names = {field.name for field in msgspec.structs.fields(Limits)}
    settings: dict[str, Any] = {k: v for k, v in args.items() if k not in limit_names}
    settings["limits"] = {k: v for k, v in args.items() if k in limit_names}
    try:
        return msgspec.convert(settings, ServerConfig)
    except msgspec.ValidationError as exc:
        parser.error(str(exc).replace("$.limits.", "--").replace("$.", "--").replace("_", "-"))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop to serve on: uvloop when chosen, or when installed and the choice is auto."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit(
                "nestkv: --event-loop uvloop needs uvloop: pip install 'nestkv[uvloop]'"
            ) from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback of an exception)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            # RFC 3339 in UTC, as log collectors parse it: 2026-12-07T21:50:12.345Z.
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def token_command(argv: Sequence[str]) -> None:
    """`nestkv-server token new`: a fresh token on the first line, its auth file entry after."""
    parser = argparse.ArgumentParser(
        prog="nestkv-server token",
        description="Mint a token: the token alone on the first line of stdout, then the entry to "
        "append to the --auth-file (`... | tail -n +2 >> tokens.toml`). Only the token's SHA-256 "
        "goes in the file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = commands.add_parser("new", help="mint a token and print its auth file entry")
    new.add_argument("--name", required=True, help="the token's name, for logs and metrics")
    where = new.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--path",
        action="append",
        metavar="SEGMENT",
        help="one segment of the token's root namespace, repeated for each level "
        "(checked against the default limits)",
    )
    where.add_argument(
        "--whole-store", action="store_true", help="root the token at the root: every namespace"
    )
    new.add_argument(
        "--access",
        choices=("read", "readwrite"),
        default="read",
        help="read: get, exists, expires_in, stats; readwrite: everything (default: %(default)s)",
    )
    new.add_argument(
        "--max-bytes",
        type=byte_count,
        help="a byte quota for the token's root namespace on each node, counted as --max-memory "
        "counts (512, 64K, 100M, 2G; default: none)",
    )
    args = parser.parse_args(argv)
    path = [] if args.whole_store else args.path
    fields = {"name": args.name, "sha256": "0" * 64, "path": path, "access": args.access}
    try:
        entry = msgspec.convert({**fields, "max_bytes": args.max_bytes}, TokenEntry)
        Limits().check_path(entry.path)
    except (msgspec.ValidationError, InvalidArgument) as error:
        new.error(str(error).replace("$.", "--"))
    token = new_token()
    print(token)
    print()
    print(toml_entry(entry.name, digest(token), entry.path, entry.access, entry.max_bytes), end="")


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["token"]:
        token_command(arguments[1:])
        return
    config = parse_config(arguments)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLines()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=config.log_level, handlers=[handler])
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        runner.run(serve(config))


if __name__ == "__main__":
    main()
