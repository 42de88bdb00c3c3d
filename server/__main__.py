"""Command line: `python -m nestkv.server [flags]` or `nestkv-server`; flags map onto ServerConfig."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from nestkv.server.app import serve
from nestkv.server.config import ServerConfig
from nestkv.server.limits import Limits

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
    "log_format": "text, or json: one JSON object a line (default: %(default)s)",
    "max_key_bytes": "largest key in bytes of UTF-8 (default: %(default)s)",
    "max_value_bytes": "largest value in bytes; gRPC message limits follow it (default: %(default)s)",
    "max_depth": "most namespace segments in a path (default: %(default)s)",
    "max_segment_bytes": "largest namespace segment in bytes of UTF-8 (default: %(default)s)",
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


_TYPES: dict[str, Callable[[str], Any]] = {"max_memory": byte_count, "metrics_port": int}


def _add_flags(parser: argparse.ArgumentParser, struct: type[msgspec.Struct], skip: str = "") -> None:
    for field in msgspec.structs.fields(struct):
        if field.name == skip:
            continue
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_TYPES.get(field.name, type(field.default)),
            default=field.default,
            help=_HELP[field.name],
        )


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse flags into a ServerConfig; an invalid value exits with a message naming the flag."""
    parser = argparse.ArgumentParser(
        prog="nestkv-server", description="Serve the nestkv namespaced key/value store over gRPC."
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
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
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
