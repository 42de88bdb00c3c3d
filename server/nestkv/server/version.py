"""The version of the installed nestkv package, as Stats and the ready line report it."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("nestkv")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
