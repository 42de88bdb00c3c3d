"""`python -m bench` runs end to end on small sizes, so that `make bench` does not rot between uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_bench(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` run to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_bench_runs_and_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--operations", "400", "--keys", "3000", "--namespace-keys", "500", "--gather-sizes", "300,900"]
    args += ["--json", str(out)]
    done = run_bench("bench", args)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for store in ("LocalStore", "GrpcStore"):
        rows = [row for row in results["mixed"] if row["store"] == store]
        assert [row["tasks"] for row in rows] == [1, 16, 64, 256]
        assert all(row["ops_per_s"] > 0 and row["p99_us"] >= row["p50_us"] > 0 for row in rows)
    assert results["nestkv"]["delete_all_s"] > 0
    assert [row["operations"] for row in results["gather"]] == [300, 900]
    overheads = results["overheads"]
    assert [row["variant"] for row in overheads] == [
        "plaintext",
        "--metrics-port",
        "TLS",
        "TLS + token",
        "TLS + token as metadata",
    ]
    assert all(row["mixed_ops_per_s"] > 0 and row["unary_ops_per_s"] > 0 for row in overheads)
    assert "| TLS + token |" in done.stdout
    assert "| gather of 900 single ops |" in done.stdout
    assert "| mixed, 64 tasks | GrpcStore |" in done.stdout
    assert ("redis" in results) != ("redis_skipped" in results)


def test_snapshot_bench_runs_and_reports_every_figure() -> None:
    args = ["--keys", "20000", "--load-seconds", "1"]
    done = run_bench("bench.snapshot", args)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["pause"]["keys"] == 20_000
    assert results["pause"]["snapshot_s"] > 0
    assert results["pause"]["recovery_s"] > 0
    assert results["under_load"]["snapshots_completed"] >= 1
    assert results["under_load"]["snapshots_failed"] == 0


def test_cluster_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    args = ["--nodes", "1,2", "--tasks", "8", "--seconds", "0.5", "--rounds", "1", "--keys", "500"]
    args += ["--restart-keys", "1000", "--json", str(out)]
    done = run_bench("bench.cluster", args)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    rows = results["throughput"]
    assert [(row["nodes"], row["client"], row["client_processes"]) for row in rows] == [
        (1, "topology-aware", 1),
        (2, "topology-aware", 2),
        (2, "pinned to node-0", 2),
    ]
    for row in rows:
        assert row["ops_per_s"] > 0
        assert row["ops_per_s_vs_baseline"] > 0
        assert row["server_cpu_us_per_op"] > 0
        assert row["server_cpu_per_op_vs_baseline"] > 0
        assert row["client_cpu_us_per_op"] > 0
        assert row["ops_per_batch"] >= 1
    assert rows[0]["ops_per_s_vs_baseline"] == 1.0
    assert rows[2]["baseline"] == "2 node(s), topology-aware"
    # Behaviour, not timing: a routing client's operations reach their owners; a pinned one's half do not.
    assert rows[0]["forwarded_share"] == rows[1]["forwarded_share"] == 0
    assert 0.3 < rows[2]["forwarded_share"] < 0.7
    restart = results["restart"]
    assert restart["recovered_entries"] == 1000
    assert restart["stop_exit_code"] == 0
    assert restart["empty_start_s"] > 0
    assert restart["start_s"] > 0
    assert restart["start_vs_empty"] > 0
    assert isinstance(results["server_log_problems"], list)
    assert "| 2 | pinned to node-0 | 2 |" in done.stdout
    assert "| start with 1,000 keys, spawn to ready line |" in done.stdout


def test_fairness_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "fairness.json"
    args = ["--batches", "3", "--batch-size", "2000", "--baseline-seconds", "0.5", "--json", str(out)]
    done = run_bench("bench.fairness", args)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["flood"] == {"batches": 3, "batch_size": 2000, "seconds": results["flood"]["seconds"]}
    for key in ("alone", "during_flood"):
        assert results[key]["reads"] > 0
        assert results[key]["worst_ms"] >= results[key]["p99_ms"] >= results[key]["median_ms"] > 0
    assert results["worst_ratio"] > 0
    assert "| during the flood |" in done.stdout


def test_replicas_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    args = ["--tasks", "8", "--seconds", "0.5", "--rounds", "1", "--keys", "500", "--kills", "1"]
    done = run_bench("bench.replicas", [*args, "--json", str(out)])
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for replicas in ("replicas_1", "replicas_2"):
        figures = results[replicas]
        assert figures["ops_per_s"] > 0
        assert figures["write_p50_ms"] > 0
        assert figures["server_cpu_per_write_us"] > 0
    assert set(results["ratio_2_to_1"]) == {"ops_per_s", "write_p50_ms", "server_cpu_per_write_us"}
    # The nodes' messages, from their metrics: R=2 sends replicas, R=1 none.
    assert results["replicas_1"]["operations_per_client_batch"] >= 1
    assert results["replicas_1"]["replica_batches_per_client_batch"] == 0
    assert results["replicas_2"]["replica_batches_per_client_batch"] > 0
    assert results["replicas_2"]["operations_per_replica_batch"] >= 1
    assert "replica batches per client batch" in done.stdout
    # Behaviour, not timing: the killed node's keys are read again after the kill.
    [first] = results["failover_first_success_s"]
    [every] = results["failover_all_succeed_s"]
    assert first > 0
    assert every >= 0
    assert "kill -9 to the first successful read" in done.stdout
    [paused] = results["pause_first_success_s"]
    assert paused > 0
    assert "SIGSTOP to the first successful read" in done.stdout
    # Redis Cluster, with and without replicas, where redis-server is installed; else said why not.
    if "redis_cluster_skipped" in results:
        assert "Redis Cluster rows skipped" in done.stdout
    else:
        assert set(results["redis_cluster"]) == {
            "Redis Cluster, 3 masters",
            "Redis Cluster, 3 masters + 3 replicas",
        }
        assert all(row["ops_per_s"] > 0 for row in results["redis_cluster"].values())


def test_atomic_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "atomic.json"
    args = ["--tasks", "8", "--seconds", "0.3", "--rounds", "1", "--keys", "50", "--json", str(out)]
    done = run_bench("bench.atomic", args)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["settings"] == {"tasks": 8, "seconds": 0.3, "rounds": 1, "keys": 50}
    stores = ["nestkv"] + (["redis"] if "redis" in results else [])
    for store in stores:
        figures = results[store]
        assert figures["ops_per_s"] > 0
        assert figures["p99_us"] >= figures["p50_us"] > 0
        assert figures["server_cpu_us_per_op"] > 0
        assert figures["client_cpu_us_per_op"] > 0
        assert len(figures["ops_per_s_rounds"]) == 1
        # Behaviour, not timing: every increment made is in the counters, once.
        assert figures["counts_exact"] is True
        assert figures["counters_sum"] == figures["increments_made"] >= figures["operations"] > 0
    assert ("redis" in results) != ("redis_skipped" in results)
    if "redis" in results:
        assert results["ratio_nestkv_to_redis"]["ops_per_s"] > 0
        assert results["goal_met"] == (results["ratio_nestkv_to_redis"]["ops_per_s"] >= 3)
        assert "| Redis INCR (redis.asyncio, pool) |" in done.stdout
    assert "| nestkv GrpcStore.increment |" in done.stdout


def test_ratelimit_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "ratelimit.json"
    args = ["--connections", "4", "--seconds", "0.3", "--rounds", "1", "--workers", "2", "--json", str(out)]
    done = run_bench("bench.ratelimit", args)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    settings = results["settings"]
    assert (settings["connections"], settings["seconds"], settings["rounds"], settings["workers"]) == (
        4,
        0.3,
        1,
        2,
    )
    setups = ["nestkv", "none"] + (["redis"] if "redis" in results else [])
    for setup in setups:
        figures = results[setup]
        assert figures["requests_per_s"] > 0
        assert figures["p99_ms"] >= figures["p50_ms"] > 0
        assert figures["app_cpu_us"] > 0
        assert figures["client_cpu_us"] > 0
        assert figures["workers_reached_min"] >= 1
        assert len(figures["requests_per_s_rounds"]) == 1
        # Behaviour, not timing: the limit is out of reach, so nothing is refused.
        assert figures["not_200"] == 0
    # Every request of a round is counted on the nestkv server, once.
    assert results["nestkv"]["counts_exact"] is True
    assert results["nestkv"]["counted"] == results["nestkv"]["requests"] > 0
    assert results["none"]["store_cpu_us"] == 0
    assert set(results["ratio_to_none"]) == set(setups) - {"none"}
    assert ("redis" in results) != ("redis_skipped" in results)
    if "redis" in results:
        assert 0 < results["redis"]["recorded"] <= results["redis"]["requests"]
        assert results["ratio_nestkv_to_redis"]["requests_per_s"] > 0
        assert "| stock RateLimitMiddleware, RedisStore |" in done.stdout
    assert "| CountingRateLimitMiddleware, nestkv |" in done.stdout
    assert "| no rate limiting (ceiling) |" in done.stdout


def test_scan_benches_run_and_report_every_figure() -> None:
    args = ["--keys", "20000", "--page", "500", "--operations", "1000", "--rounds", "1"]
    done = run_bench("bench.scan", [*args, "--children", "50", "--per-child", "30"])
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for scan in (*results["flat"].values(), *results["recursive"].values()):
        if isinstance(scan, dict):
            assert scan["p99_ms"] >= scan["p50_ms"] > 0
    assert results["flat"]["indexed_scan"]["listed"] == 20_000
    assert results["recursive"]["indexed_scan"]["listed"] == 1500
    assert results["memory"]["index_keys"] == 20_000
    assert results["writes"]["set_new_key_index_us"] > 0
    done = run_bench("bench.scan_alternatives", ["--keys", "20000", "--adds", "500"])
    assert done.returncode == 0, done.stderr
    alternatives = json.loads(done.stdout)
    assert alternatives["insertion_order_islice"]["delete_before_cursor_misses_a_key"]
    assert alternatives["sorted_sublists"]["pages"] == alternatives["hash_buckets"]["pages"] == 21
