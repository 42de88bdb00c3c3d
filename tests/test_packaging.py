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


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sources as they are, so that a build leaves nothing in the checkout."""
    source = tmp_path_factory.mktemp("source")
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(source / "src.tar"), "HEAD"], check=True
    )
    subprocess.run(["tar", "-xf", "src.tar"], cwd=source, check=True)
    for changed in subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--modified", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split():
        path, copy = ROOT / changed, source / changed  # the working tree as it is, uncommitted too
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            copy.unlink(missing_ok=True)
            copy.symlink_to(path.readlink())
        elif path.is_file():
            copy.write_bytes(path.read_bytes())
    (source / "src.tar").unlink()
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


def test_the_wheel_holds_nestkv_and_nothing_else_at_the_top_level(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names} == {"nestkv", "nestkv-0.1.0.dist-info"}
    for expected in (
        "nestkv/py.typed",
        "nestkv/v1/store_pb2.py",
        "nestkv/v1/store_pb2.pyi",
        "nestkv/v1/store_pb2_grpc.py",
        "nestkv/v1/store.proto",
        "nestkv/server/__main__.py",
        "nestkv/server/py.typed",
        "nestkv/server/storage/engine.py",
        "nestkv/client/store.py",
        "nestkv/client/py.typed",
    ):
        assert expected in names
    entry_points = wheel.read("nestkv-0.1.0.dist-info/entry_points.txt").decode()
    assert "nestkv-server = nestkv.server.__main__:main" in entry_points


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
