"""`python -m nestkv.client`: the `nestkv` command (see nestkv.client.cli)."""

from __future__ import annotations

from nestkv.client.cli import main

if __name__ == "__main__":
    main()
