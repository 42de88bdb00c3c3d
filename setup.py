"""Build hooks: find nestkv's packages in its four folders, and generate the protobuf code.

nestkv is one PEP 420 namespace package whose parts live in `protos/` (the generated
code), `wire/` (what client and server share), `server/` and `client/`.
setuptools' own discovery (`[tool.setuptools.packages.find]` with several `where` folders) maps a
namespace to one folder only, so the packages are found here, each with the folder it lives in.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
FOLDERS = ("protos", "wire", "server", "client")


def package_folders() -> dict[str, str]:
    """Every package under nestkv (the namespace itself excepted), and its folder."""
    folders: dict[str, str] = {}
    for folder in FOLDERS:
        for package in find_namespace_packages(str(ROOT / folder), include=["nestkv.*"]):
            if "__pycache__" not in package.split("."):
                folders[package] = "/".join([folder, *package.split(".")])
    return folders


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate = runpy.run_path(str(ROOT / "protos" / "generate.py"))["generate"]
        generate()
        super().run()


FOUND = package_folders()
setup(
    packages=["nestkv", *FOUND],
    package_dir={"nestkv": "protos/nestkv", **FOUND},
    cmdclass={"build_py": BuildPyWithProtos},
)
