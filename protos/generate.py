"""Generate the Python code for every .proto under protos/, beside the .proto.

The one command that produces generated code: `make gen` runs it, and so does
the package build (setup.py), so `pip install .` of a fresh clone works.
Generated files (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`, and the
`__init__.py` and `py.typed` that make their folder a package) are never
edited and never committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={PROTOS}",
        f"--pyi_out={PROTOS}",
        f"--grpc_python_out={PROTOS}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")
    # Mark every directory that holds generated code as a typed package, but not the top one
    # (protos/nestkv): nestkv is a namespace package that server/ and client/ add to. Earlier
    # versions marked it too: a checkout they generated in must lose those files.
    for stale in ("__init__.py", "py.typed"):
        (PROTOS / "nestkv" / stale).unlink(missing_ok=True)
    for proto in sources:
        for parent in (PROTOS / proto).parents:
            if parent.parent == PROTOS:
                break
            (parent / "__init__.py").touch()
            (parent / "py.typed").touch()


if __name__ == "__main__":
    generate()
    sys.exit(0)
