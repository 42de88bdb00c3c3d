"""The README's Litestar examples type-check under `mypy --strict`, as a type-checked app's would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_the_litestar_examples_pass_mypy_strict(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("### Litestar") : text.index("### Command line")]
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # the app, then its rate limit
    example = tmp_path / "example.py"
    example.write_text("\n".join(blocks))  # the second goes on from the first ("as above")
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=README.parent,  # the project's mypy settings: nestkv's sources on mypy_path
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
