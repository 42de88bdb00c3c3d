"""`python -m bench.scan`: what the scan prototype (storage.scan) costs, in process.

* flat: a full scan, `--page` keys a page, of one namespace of `--keys` keys
  (21-byte keys written in random order, 100-byte values with a TTL): each
  page's time, the first one (the index built a step at a time) apart, and its
  longest step (the longest the event loop would stall); then the same scan
  again with the index there, with values, and with a writer adding and
  deleting a tenth of a page of keys between pages.
* memory: what the index of that namespace allocates (tracemalloc), at its
  peak while built, and what is left once it is dropped.
* writes: NamespacedStorage.set of new keys, overwrites and deletes in that
  namespace, without an index and while one exists, in alternating rounds (CPU
  µs per operation, best of `--rounds`). Run it under another checkout's PYTHONPATH (`--only writes`) to
  compare with code that has no hook.
* recursive: a full recursive scan of a namespace of `--children` child
  namespaces of `--per-child` keys each.

The garbage collector runs as in the server, after the full collection loading made due; a
page that meets a full collection pays for it (with keys that expire, the expiry wheel's
lists make it ~22 ms with one namespace of 1M keys, ~320 ms with 10,000 of 100). Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from nestkv.server.storage import NamespacedStorage

VALUE = b"v" * 100
PATH = ("bench",)


class Clock:
    """time.monotonic, which a test may move ahead (to let indexes go idle)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def loaded(keys: int, clock: Clock, path: tuple[str, ...] = PATH, seed: int = 1) -> NamespacedStorage:
    storage = NamespacedStorage(clock)
    order = list(range(keys))
    random.Random(seed).shuffle(order)  # not in the scan's order, in the dict or in memory
    for i in order:
        storage.set(path, f"key-{i:016d}", VALUE, ttl=3600)
    gc.collect()  # the full collection the load has made due, as a server would have had it by now
    return storage


def percentiles(times: list[float], prefix: str = "") -> dict[str, float]:
    ordered = sorted(times)
    return {
        f"{prefix}p50_ms": 1000 * ordered[len(ordered) // 2],
        f"{prefix}p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        f"{prefix}max_ms": 1000 * ordered[-1],
        f"{prefix}mean_ms": 1000 * statistics.fmean(ordered),
    }


def full_scan(
    storage: NamespacedStorage,
    path: tuple[str, ...],
    page_size: int,
    *,
    recursive: bool = False,
    values: bool = False,
    between: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Scan to the end. A page's time is the time of every call it took (an index build's steps
    included, the other requests they let run excluded), wall and CPU (`cpu_`: this process's,
    which the other work on a shared machine does not inflate); `longest_call_ms`: the longest
    call, what the event loop would stall."""
    cursor = b""
    pages: list[float] = []
    cpu: list[float] = []
    first: dict[str, float] = {}
    longest = 0.0
    listed = 0
    while True:
        spent, spent_cpu, calls = 0.0, 0.0, 0
        while True:
            started, started_cpu = time.perf_counter(), time.process_time()
            page = storage.scan(path, cursor, page_size, recursive=recursive, values=values)
            took = time.perf_counter() - started
            spent_cpu += time.process_time() - started_cpu
            spent += took
            calls += 1
            longest = max(longest, took)
            if page is not None:
                break
        if not pages:
            first = {
                "first_page_ms": 1000 * spent,
                "first_page_cpu_ms": 1000 * spent_cpu,
                "first_page_calls": calls,
            }
        pages.append(spent)
        cpu.append(spent_cpu)
        listed += len(page.items)
        if page.done:
            break
        cursor = page.cursor
        if between is not None:
            between(len(pages))
    return {
        "pages": len(pages),
        **percentiles(pages),
        **percentiles(cpu, "cpu_"),
        **first,
        "longest_call_ms": 1000 * longest,
        "listed": listed,
    }


def flat(keys: int, page_size: int) -> dict[str, Any]:
    clock = Clock()
    storage = loaded(keys, clock)
    results = {"first_scan": full_scan(storage, PATH, page_size)}
    results["indexed_scan"] = full_scan(storage, PATH, page_size)
    results["indexed_scan_with_values"] = full_scan(storage, PATH, page_size, values=True)

    churned = page_size // 10

    def churn(page: int) -> None:
        # New keys land ahead of the cursor as often as behind it: a tenth of a page a page, so
        # that the scan still ends (a writer adding keys ahead faster than pages go never lets it).
        for i in range(churned):
            storage.set(PATH, f"key-{random.randrange(keys):016d}+{page}", VALUE, ttl=3600)
            storage.delete(PATH, f"key-{(page * churned + i) % keys:016d}")

    results[f"indexed_scan_with_{churned}_inserts_and_deletes_between_pages"] = full_scan(
        storage, PATH, page_size, between=churn
    )
    return results


def memory(keys: int) -> dict[str, Any]:
    clock = Clock()
    storage = loaded(keys, clock)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        while storage.scan(PATH, b"", 1) is None:
            pass
        gc.collect()
        built, peak = tracemalloc.get_traced_memory()
        held = storage.scan_indexes.held()
        clock.offset += 3600
        storage.reap(0)  # drops the idle index (and reaps nothing)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {
        "keys": keys,
        "index_keys": held,
        "index_bytes_per_key": (built - before) / keys,
        "peak_while_building_bytes_per_key": (peak - before) / keys,
        "left_after_drop_bytes": after - before,
        "store_used_memory_per_key": storage.used_memory / keys,
    }


def writes(keys: int, operations: int, rounds: int) -> dict[str, Any]:
    clock = Clock()
    storage = loaded(keys, clock)
    has_scan = hasattr(storage, "scan")
    best: dict[str, float] = {}

    def timed(name: str, fresh: list[str], operation: Callable[[str], object]) -> None:
        started = time.process_time()  # CPU: what the shared machine's other work does not inflate
        for key in fresh:
            operation(key)
        per_op = (time.process_time() - started) / operations * 1e6
        best[name] = min(best.get(name, per_op), per_op)

    def put(key: str) -> object:
        return storage.set(PATH, key, VALUE, ttl=3600)

    def delete(key: str) -> object:
        return storage.delete(PATH, key)

    node = storage._tree.find(PATH)
    holder = None
    if has_scan:
        while storage.scan(PATH, b"", 1) is None:  # the index, built once
            pass
        assert node is not None
        holder = node.scan
    for round_ in range(rounds):  # rounds with and without, alternating: the machine drifts
        for indexed in (False, True) if has_scan else (False,):
            if has_scan:
                # Unhooked, not dropped, between rounds: what the hook costs, not the builds.
                assert node is not None
                node.scan = holder if indexed else None
            label = "index" if indexed else "no_index"
            rng = random.Random(round_)  # between the keys there, not all after them
            fresh = [f"key-{rng.randrange(keys):016d}+{label}{round_}" for _ in range(operations)]
            timed(f"set_new_key_{label}_us", fresh, put)
            timed(f"set_overwrite_{label}_us", fresh, put)
            timed(f"delete_{label}_us", fresh, delete)
    results: dict[str, Any] = {"keys": keys, "operations": operations, "rounds": rounds, **best}
    if has_scan:
        for op in ("set_new_key", "set_overwrite", "delete"):
            results[f"{op}_index_ratio"] = best[f"{op}_index_us"] / best[f"{op}_no_index_us"]
    return results


def recursive(children: int, per_child: int, page_size: int) -> dict[str, Any]:
    clock = Clock()
    storage = NamespacedStorage(clock)
    order = [(c, k) for c in range(children) for k in range(per_child)]
    random.Random(2).shuffle(order)
    for c, k in order:
        storage.set((*PATH, f"child-{c:08d}"), f"key-{k:016d}", VALUE, ttl=3600)
    del order
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    full_collection_ms = 1000 * (time.perf_counter() - started)
    results: dict[str, Any] = {
        "children": children,
        "per_child": per_child,
        "full_gc_collection_ms": full_collection_ms,  # the store's own, whatever scans do
    }
    results["first_scan"] = full_scan(storage, PATH, page_size, recursive=True)
    results["indexed_scan"] = full_scan(storage, PATH, page_size, recursive=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scan", description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--per-child", type=int, default=100)
    parser.add_argument("--only", choices=["flat", "memory", "writes", "recursive"], action="append")
    args = parser.parse_args()
    only = set(args.only or ["flat", "memory", "writes", "recursive"])
    results: dict[str, Any] = {}
    if "flat" in only:
        results["flat"] = flat(args.keys, args.page)
    if "memory" in only:
        results["memory"] = memory(args.keys)
    if "writes" in only:
        results["writes"] = writes(args.keys, args.operations, args.rounds)
    if "recursive" in only:
        results["recursive"] = recursive(args.children, args.per_child, args.page)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
