"""Build hook: generate the protobuf code before packaging (see protos/generate.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate = runpy.run_path(str(Path(__file__).parent / "protos" / "generate.py"))["generate"]
        generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
