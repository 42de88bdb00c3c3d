"""The nestkv server: namespaced in-memory storage served over gRPC (`python -m nestkv.server`)."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("nestkv")
    """The version of the installed nestkv package."""
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
