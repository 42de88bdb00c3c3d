"""What `pip install nestkv` installs: one import package, nestkv, that no app's own modules can shadow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.serverproc import READY

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("protos", "wire", "server", "client")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree's files (committed or not, ignored ones left out), to build from."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        path, copy = ROOT / name, source / name
        if path.is_file():  # not a file deleted in the working tree
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    return source


def build_wheel(source: Path, out: Path) -> zipfile.ZipFile:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out)]
    built = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("nestkv-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    return build_wheel(source, tmp_path_factory.mktemp("wheel"))


def test_the_sdist_builds_the_same_wheel(source: Path, wheel: zipfile.ZipFile, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", f"import setuptools.build_meta as b; b.build_sdist({str(tmp_path)!r})"],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=300,
    )
    (sdist,) = tmp_path.glob("nestkv-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    again = build_wheel(unpacked, tmp_path / "wheel")
    assert sorted(again.namelist()) == sorted(wheel.namelist())


# What the source tree holds under the package folders and the wheel leaves out on purpose.
LEFT_OUT = {"protos/generate.py"}  # the build's code generator, run by setup.py


def package_files(source: Path) -> set[str]:
    """The files under protos/, wire/, server/ and client/ (generated ones included), as wheel paths."""
    files = set()
    for folder in PACKAGE_FOLDERS:
        for path in (source / folder).rglob("*"):
            name = path.relative_to(source).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and name not in LEFT_OUT:
                files.add(path.relative_to(source / folder).as_posix())
    return files


def test_the_wheel_holds_every_file_of_the_package_folders_and_nothing_else(
    source: Path, wheel: zipfile.ZipFile
) -> None:
    # The wheel fixture built in `source`, so the generated code is there too.
    packaged = {name for name in wheel.namelist() if not name.startswith("nestkv-0.1.0.dist-info/")}
    expected = package_files(source)
    assert {name for name in expected if name.endswith(".py")} >= {
        "nestkv/server/cluster/__init__.py",
        "nestkv/server/storage/engine.py",
        "nestkv/client/store.py",
        "nestkv/v1/store_pb2.py",
        "nestkv/v1/store_pb2_grpc.py",
    }
    assert packaged == expected
    for name in LEFT_OUT:
        assert (source / name).is_file(), f"{name} is left out on purpose but no longer exists"


def test_every_package_is_typed(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    packages = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    # PEP 561: nestkv is a namespace package; each of its parts says it is typed.
    assert {"nestkv/server", "nestkv/client", "nestkv/v1"} <= packages
    for package in ("nestkv/server", "nestkv/client", "nestkv/v1"):
        assert f"{package}/py.typed" in names
    assert "nestkv/__init__.py" not in names


def test_the_wheel_names_its_console_scripts(wheel: zipfile.ZipFile) -> None:
    entry_points = wheel.read("nestkv-0.1.0.dist-info/entry_points.txt").decode()
    assert "nestkv-server = nestkv.server.__main__:main" in entry_points
    assert "nestkv = nestkv.client.cli:main" in entry_points


def test_the_server_starts_from_a_folder_with_its_own_server_and_client(tmp_path: Path) -> None:
    # What a Litestar app's folder often holds: python -m puts it first on sys.path.
    (tmp_path / "server.py").write_text("raise SystemExit('the app server.py ran')\n")
    (tmp_path / "client.py").write_text("raise SystemExit('the app client.py ran')\n")
    script = Path(sys.executable).parent / "nestkv-server"
    for command in ([sys.executable, "-m", "nestkv.server"], [str(script)]):
        process = subprocess.Popen(
            [*command, "--port", "0"],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            assert process.stderr is not None
            for line in process.stderr:
                assert "the app" not in line
                if READY.search(line.strip()):
                    break
            else:
                pytest.fail(f"{command} exited without serving")
        finally:
            process.terminate()
            assert process.wait(30) == 0


def test_importing_the_client_loads_no_server_machinery() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import json, sys, nestkv.client; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(json.loads(loaded.stdout))
    assert "nestkv.client" in modules
    # The storage engine is LocalStore's; the gRPC server, the servicer and persistence are not.
    # (grpc itself imports the top modules of grpc_health and grpc_reflection when installed.)
    assert not modules & {"nestkv.server.app", "nestkv.server.service", "nestkv.server.__main__"}
    assert "nestkv.server.storage.persistence" not in modules
    assert not [module for module in modules if re.match(r"^(server|client)(\.|$)", module)]
