"""Rewords every message a nestkv server sends, in each Python process started with this folder on
its PYTHONPATH (tests/test_reworded.py runs part of the suite so, servers included).

What a client does after a failure must come from the error's fields (OperationError.reason and
.applied, the google.rpc.ErrorInfo of a call's status), never from its words: with every word
changed, the tests of what clients do must still pass.
"""

from __future__ import annotations

from nestkv.server import errors


def _reworded(fault: errors.StoreFault) -> str:
    return f"reworded: {type(fault).__name__}"


errors.StoreFault.__str__ = _reworded  # type: ignore[method-assign, assignment]
errors.StoreFault.confined = _reworded  # type: ignore[method-assign, assignment]
