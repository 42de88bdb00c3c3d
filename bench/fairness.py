"""How long another tenant waits behind one caller's flood of big batches.

A cluster of three nodes on this machine. The flood: Pipeline batches of `exists` sent back to back
on one stream to node-0, two thirds of them owned (so forwarded) elsewhere. Meanwhile another
tenant reads one key through node-0, one get after another, and every get's latency is kept. The
same reader alone, in the same run, is the baseline; the figures are its worst and 99th-percentile
waits, and their ratios to the baseline's.

    python -m bench.fairness                          # 40 batches of 10,000 (the default limit)
    python -m bench.fairness --batches 1 --batch-size 400000 --limit 400000   # one huge batch
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from nestkv.client import GrpcStore, StoreError, channel_options
from nestkv.v1 import store_pb2 as pb
from nestkv.v1 import store_pb2_grpc
from tests.clusterproc import ClusterProcesses

Row = dict[str, Any]


def flood_batch(batch_id: int, size: int) -> pb.PipelineRequest:
    return pb.PipelineRequest(
        id=batch_id,
        operations=[
            pb.Operation(exists=pb.ExistsRequest(path=["flood"], key=f"b{batch_id}-{n}")) for n in range(size)
        ],
    )


async def reads(store: GrpcStore, until: asyncio.Event | None, seconds: float) -> tuple[list[float], int]:
    """Latencies of gets one after another, until `until` is set (or for `seconds`), and how many
    failed (a failed get's latency is the time until it failed)."""
    latencies = []
    failed = 0
    stop = time.perf_counter() + seconds
    while (until is None and time.perf_counter() < stop) or (until is not None and not until.is_set()):
        began = time.perf_counter()
        try:
            await store.get("probe")
        except StoreError:
            failed += 1
        latencies.append(time.perf_counter() - began)
    return latencies, failed


async def flood(target: str, batches: list[pb.PipelineRequest], started: asyncio.Event) -> float:
    """Send `batches` on one stream and read every answer; the seconds it took."""
    total = sum(len(batch.operations) for batch in batches)
    async with grpc.aio.insecure_channel(target, options=channel_options(64 * 1024 * 1024)) as channel:
        call = store_pb2_grpc.StoreServiceStub(channel).Pipeline()
        began = time.perf_counter()

        async def send() -> None:
            for batch in batches:
                await call.write(batch)
                started.set()
            await call.done_writing()

        async def receive() -> None:
            answered = 0
            while answered < total:
                response = await call.read()
                answered += len(response.results)

        await asyncio.gather(send(), receive())
        return time.perf_counter() - began


def figures(latencies: list[float]) -> Row:
    ordered = sorted(latencies)
    return {
        "reads": len(ordered),
        "worst_ms": round(ordered[-1] * 1000, 2),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2),
        "median_ms": round(statistics.median(ordered) * 1000, 3),
    }


async def measure(args: argparse.Namespace) -> Row:
    extra = ("--max-batch-operations", str(args.limit)) if args.limit else ()
    with (
        tempfile.TemporaryDirectory() as directory,
        ClusterProcesses(Path(directory), 3, *extra, data=False) as nodes,
    ):
        target = nodes.target("node-0")
        async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
            reader = GrpcStore(channel).with_namespace("other-tenant")
            await reader.set("probe", b"here")
            baseline, _ = await reads(reader, None, args.baseline_seconds)
            batches = [flood_batch(n + 1, args.batch_size) for n in range(args.batches)]
            started, done = asyncio.Event(), asyncio.Event()
            flooding = asyncio.create_task(flood(target, batches, started))
            await started.wait()  # the first batch is on its way
            during = asyncio.create_task(reads(reader, done, 0))
            seconds = await flooding
            done.set()
            latencies, failed = await during
    alone, flooded = figures(baseline), {**figures(latencies), "failed": failed}
    return {
        "flood": {"batches": args.batches, "batch_size": args.batch_size, "seconds": round(seconds, 2)},
        "alone": alone,
        "during_flood": flooded,
        "worst_ratio": round(flooded["worst_ms"] / alone["worst_ms"], 1),
        "p99_ratio": round(flooded["p99_ms"] / alone["p99_ms"], 1),
    }


def report(results: Row) -> str:
    shape = results["flood"]
    lines = [
        f"Flood: {shape['batches']} batches of {shape['batch_size']} exists to node-0 of 3, "
        f"answered in {shape['seconds']} s",
        "| another tenant's get through node-0 | reads | failed | median ms | p99 ms | worst ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in (("alone (baseline)", "alone"), ("during the flood", "during_flood")):
        row = results[key]
        lines.append(
            f"| {label} | {row['reads']} | {row.get('failed', 0)} | {row['median_ms']} | {row['p99_ms']} "
            f"| {row['worst_ms']} |"
        )
    lines.append(f"worst wait {results['worst_ratio']}x the baseline's, p99 {results['p99_ratio']}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches in the flood")
    parser.add_argument("--batch-size", type=int, default=10_000, help="operations per batch")
    parser.add_argument("--limit", type=int, default=0, help="the nodes' --max-batch-operations (0: default)")
    parser.add_argument("--baseline-seconds", type=float, default=3.0, help="how long the reader runs alone")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
