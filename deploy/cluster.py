"""`make cluster`: N nodes on this machine, on consecutive ports, each line of output led by its node.

    python deploy/cluster.py N FIRST_PORT DIRECTORY [server flags...]

It writes DIRECTORY/members, starts node-0 .. node-(N-1) with their data in
DIRECTORY/node-I, and stops them all (SIGTERM, so each finishes as it would
under Kubernetes) on SIGTERM or Ctrl-C, when the process that started it
(make) is gone, or when one of them exits (its lines say why): no node
outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

WATCH_EVERY = 0.2
"""Seconds between two looks at whether a node, or the process that started this one, is gone."""


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or not argv[1].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    count, first_port, directory, flags = int(argv[0]), int(argv[1]), Path(argv[2]), argv[3:]
    directory.mkdir(parents=True, exist_ok=True)
    members = directory / "members"
    written = directory / "members.new"
    written.write_text("".join(f"node-{n}=127.0.0.1:{first_port + n}\n" for n in range(count)))
    written.replace(members)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    parent = os.getppid()
    nodes = [start(n, first_port + n, members, directory / f"node-{n}", flags) for n in range(count)]
    printers = [
        threading.Thread(target=prefix, args=(f"node-{n}", node), daemon=True) for n, node in enumerate(nodes)
    ]
    for printer in printers:
        printer.start()
    while not stopping.is_set() and os.getppid() == parent and all(node.poll() is None for node in nodes):
        stopping.wait(WATCH_EVERY)
    for node in nodes:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
    codes = [node.wait() for node in nodes]
    for printer in printers:
        printer.join(5)
    return 0 if all(code == 0 for code in codes) else 1


def start(number: int, port: int, members: Path, data: Path, flags: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "nestkv.server", "--port", str(port), "--node-id", f"node-{number}"]
    command += ["--cluster", f"@{members}", "--data-dir", str(data), *flags]
    # A process group of its own: Ctrl-C reaches this launcher, which stops each node once.
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def prefix(name: str, node: subprocess.Popen[str]) -> None:
    assert node.stdout is not None
    for line in node.stdout:
        sys.stdout.write(f"{name} | {line}")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
