"""`python -m bench.scan_alternatives`: the designs the scan prototype was chosen against, measured
on one dict of `--keys` keys (21-byte keys inserted in random order, as the store holds them).

* hash buckets: order by (h64(key), key), h64 the first 8 bytes of BLAKE2b; the index is
  2^k buckets (lists, about 16 keys each) by the top bits of h64. Build, memory, the cost
  of telling it a new key, a page of `--page` keys.
* sorted sublists (storage.scan.SortedKeys, the chosen design): the same figures.
* a flat sorted list kept with bisect.insort: the cost of an insert.
* insertion order with islice: a page's time by its position, and what a delete before
  the cursor and an LRU move do to "exactly once".
* the stable hashes the bucket order could use: ns per key.

CPU time (time.process_time), which the shared machine's other work does not inflate. Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import random
import time
import tracemalloc
import zlib
from bisect import bisect_right, insort
from collections.abc import Callable, Iterator
from typing import Any

from nestkv.server.storage import scan
from nestkv.server.storage.tree import deadline_of

_from = int.from_bytes
_blake2b = hashlib.blake2b


def h64(key: str) -> int:
    return _from(_blake2b(key.encode(), digest_size=8).digest(), "big")


class HashBuckets:
    """Keys by (h64, key): 2^bits buckets (lists) of about 16 keys by the top bits of h64. Adding
    appends (a key added back is there twice: a page drops the copy as it sorts its bucket)."""

    def __init__(self, names: list[str]) -> None:
        self.bits = max(4, (max(len(names), 1) // 16).bit_length())
        self.shift = 64 - self.bits
        self.buckets: list[list[str]] = [[] for _ in range(1 << self.bits)]
        buckets, shift = self.buckets, self.shift
        for name in names:
            buckets[h64(name) >> shift].append(name)

    def add(self, name: str) -> None:
        self.buckets[h64(name) >> self.shift].append(name)

    def after(self, key: str | None) -> Iterator[str]:
        if key is None:
            b, position = 0, (-1, "")
        else:
            position = (h64(key), key)
            b = position[0] >> self.shift
        first = True
        for bucket in itertools.islice(self.buckets, b, None):
            ordered = sorted({(h64(name), name) for name in bucket})
            for item in ordered[bisect_right(ordered, position) :] if first else ordered:
                yield item[1]
            first = False


def process_ms(run: Callable[[], object]) -> float:
    started = time.process_time()
    run()
    return 1000 * (time.process_time() - started)


def allocated(make: Callable[[], object]) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = make()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, made
    finally:
        tracemalloc.stop()


def pages(
    entries: dict[str, bytes], after: Callable[[str | None], Iterator[str]], page: int
) -> dict[str, float]:
    """A full scan's page times (CPU), looking each key up as a page does."""
    times: list[float] = []
    cursor: str | None = None
    listed = 0
    while True:
        started = time.process_time()
        items = []
        for key in after(cursor):
            stored = entries.get(key)
            if stored is not None and deadline_of(stored) > 0:
                items.append(key)
            cursor = key
            if len(items) == page:
                break
        times.append(time.process_time() - started)
        listed += len(items)
        if len(items) < page:
            break
    assert listed == len(entries), (listed, len(entries))
    times.sort()
    return {
        "pages": len(times),
        "p50_ms": 1000 * times[len(times) // 2],
        "p99_ms": 1000 * times[int(len(times) * 0.99)],
        "max_ms": 1000 * times[-1],
    }


def per_key_us(names: list[str], add: Callable[[str], object]) -> float:
    started = time.process_time()
    for name in names:
        add(name)
    return (time.process_time() - started) / len(names) * 1e6


def index_figures(
    build: Callable[[], HashBuckets | scan.SortedKeys], entries: dict[str, bytes], fresh: list[str], page: int
) -> dict[str, Any]:
    """What the index `build` makes costs: its build time, its memory a key, adding a key (of
    `fresh`), and the times of pages of `page` keys of `entries` through it."""
    build_ms = process_ms(build)
    memory, made = allocated(build)
    assert isinstance(made, HashBuckets | scan.SortedKeys)
    return {
        "build_ms": build_ms,
        "index_bytes_per_key": memory / len(entries),
        "add_us": per_key_us(fresh, made.add),
        **pages(entries, made.after, page),
    }


def sorted_build(names: list[str]) -> scan.SortedKeys:
    index = scan._Index(dict.fromkeys(names))
    while not index.ready(0):
        index.step(scan.BUILD_STEP)
    assert index.keys is not None
    return index.keys


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scan_alternatives", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--adds", type=int, default=50_000)
    args = parser.parse_args()
    rng = random.Random(1)
    order = list(range(args.keys))
    rng.shuffle(order)
    stored = b"v" * 100 + bytes(16) + b"\x00" * 6 + b"\xf0\x7f"  # a value, a version, deadline inf
    entries = {f"key-{i:016d}": stored for i in order}
    names = list(entries)
    fresh = [f"key-{rng.randrange(args.keys):016d}+" for _ in range(args.adds)]  # between the keys
    results: dict[str, Any] = {"keys": args.keys}

    sample = names[:100_000]
    results["hash_ns_per_key"] = {
        "blake2b_8": per_key_us(sample, h64) * 1000,
        "sha256_8": per_key_us(sample, lambda k: _from(hashlib.sha256(k.encode()).digest()[:8], "big"))
        * 1000,
        "crc32": per_key_us(sample, lambda k: zlib.crc32(k.encode())) * 1000,
        "hash_builtin_salted": per_key_us(sample, hash) * 1000,
    }

    results["hash_buckets"] = index_figures(lambda: HashBuckets(names), entries, fresh, args.page)
    results["sorted_sublists"] = index_figures(lambda: sorted_build(names), entries, fresh, args.page)

    flat = sorted(names)
    results["flat_sorted_list_insort_us"] = per_key_us(fresh[:2000], lambda k: insort(flat, k))
    flat.clear()

    at = {}
    for position in (0, args.keys // 2, args.keys - args.page):

        def page_at(start: int = position) -> list[str]:
            return list(itertools.islice(entries, start, start + args.page))

        at[f"page_at_{position}_ms"] = min(process_ms(page_at) for _ in range(5))
    # Exactly once: a page ends at position 1000 with key K; a key before it is deleted, so the
    # key after K moves to position 999: the next page, from 1000, skips it.
    demo = dict.fromkeys(names[:3000], stored)
    first = list(itertools.islice(demo, 0, 1000))
    del demo[first[0]]
    second = list(itertools.islice(demo, 1000, 2000))
    missed = names[1000] not in second
    # With an LRU policy a read moves a key to the end: a key listed already is listed again.
    demo = dict.fromkeys(names[:3000], stored)
    first = list(itertools.islice(demo, 0, 1000))
    demo[first[0]] = demo.pop(first[0])
    rest = list(itertools.islice(demo, 1000, None))
    results["insertion_order_islice"] = {
        **at,
        "delete_before_cursor_misses_a_key": missed,
        "lru_move_lists_a_key_twice": first[0] in rest,
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
