"""How a benchmark ends: its report printed with the wall time, its results written as JSON where asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(results: dict[str, Any], report: str, json_path: Path | None) -> None:
    """Print `report` and the run's wall time (`results["wall_s"]`); write `results` to `json_path`."""
    print()
    print(report)
    print(f"\nwall time {results['wall_s']:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")
