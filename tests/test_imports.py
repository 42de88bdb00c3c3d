"""Which part of nestkv may import which: the arrows of the layout, checked on the source.

nestkv.wire      imports neither the client nor the server (both import it)
nestkv.client    imports no server module; LocalStore alone uses the storage engine and limits
nestkv.server    imports no client module
storage          imports no grpc or protobuf, and of the server only storage and errors
__init__.py      re-exports only: a docstring, imports and __all__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"wire": ROOT / "wire", "client": ROOT / "client", "server": ROOT / "server"}

# (importer prefix, imported prefix): allowed although a rule below forbids it.
ALLOWED = {
    ("nestkv.client.local", "nestkv.server.storage"),
    ("nestkv.client.local", "nestkv.server.limits"),
    # The reason of a fault the storage raised, from the one table.
    ("nestkv.client.local", "nestkv.server.errors"),
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported` (None: it may)."""
    if any(_within(importer, a) and _within(imported, b) for a, b in ALLOWED):
        return None
    if _within(importer, "nestkv.wire") and (
        _within(imported, "nestkv.client") or _within(imported, "nestkv.server")
    ):
        return "the shared wire code depends on neither side"
    if _within(importer, "nestkv.client") and _within(imported, "nestkv.server"):
        return "client code does not import server code"
    if _within(importer, "nestkv.server") and _within(imported, "nestkv.client"):
        return "server code does not import client code (shared code lives in nestkv.wire)"
    if _within(importer, "nestkv.server.storage"):
        if imported.split(".")[0] in ("grpc", "google") or _within(imported, "nestkv.v1"):
            return "storage is pure Python: no gRPC, no protobuf"
        if (
            _within(imported, "nestkv.server")
            and not _within(imported, "nestkv.server.storage")
            and not _within(imported, "nestkv.server.errors")
        ):
            return "storage depends on nothing of the server but its errors"
    return None


def imports_of(source: str) -> list[str]:
    """Every module a source imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def violations(module: str, source: str) -> list[str]:
    return [
        f"{module} imports {imported}: {reason}"
        for imported in imports_of(source)
        if (reason := forbidden(module, imported)) is not None
    ]


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder in SOURCES.values():
        for path in sorted((folder / "nestkv").rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def test_every_import_goes_the_way_the_layout_allows() -> None:
    found = modules()
    assert {name for name, _ in found} >= {
        "nestkv.wire.pipeline",
        "nestkv.client.store",
        "nestkv.server.service",
    }
    wrong = [problem for name, path in found for problem in violations(name, path.read_text())]
    assert wrong == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("nestkv.server.cluster.peers", "from nestkv.client._batching import Pipeline"),
        ("nestkv.server.app", "import nestkv.client.store"),
        ("nestkv.client.store", "from nestkv.server.storage import NamespacedStorage"),
        ("nestkv.client.routing", "def f():\n    from nestkv.server import limits"),
        ("nestkv.wire.pipeline", "from nestkv.client.errors import StoreError"),
        ("nestkv.server.storage.engine", "import grpc"),
        ("nestkv.server.storage.engine", "from nestkv.server.metrics import Denials"),
    ],
)
def test_a_forbidden_import_is_found(module: str, source: str) -> None:
    assert violations(module, source)


def test_local_store_may_use_the_storage_engine() -> None:
    assert violations("nestkv.client.local", "from nestkv.server.storage import NamespacedStorage") == []
    assert violations("nestkv.client.local", "from nestkv.server.service import StoreServicer")


def test_package_init_files_only_re_export() -> None:
    for name, path in modules():
        if path.name != "__init__.py":
            continue
        body = ast.parse(path.read_text()).body
        for statement in body:
            docstring = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            exported = isinstance(statement, ast.Assign) and [
                target.id for target in statement.targets if isinstance(target, ast.Name)
            ] == ["__all__"]
            assert docstring or exported or isinstance(statement, ast.Import | ast.ImportFrom), (
                f"{name}'s __init__.py holds more than re-exports: line {statement.lineno}"
            )
