"""`python -m bench` runs end to end on small sizes, so that `make bench` does not rot between uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_runs_and_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--operations", "400", "--keys", "3000", "--namespace-keys", "500", "--gather-sizes", "300,900"]
    args += ["--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=300, check=False
    )
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
    done = subprocess.run(
        [sys.executable, "-m", "bench.snapshot", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["pause"]["keys"] == 20_000
    assert results["pause"]["snapshot_s"] > 0
    assert results["pause"]["recovery_s"] > 0
    assert results["under_load"]["snapshots_completed"] >= 1
    assert results["under_load"]["snapshots_failed"] == 0
