"""Every fenced code block of README.md and docs/*.md is run against real servers, or checked.

A block's info string (the words after its opening fence) says what is done with it:

    python              mypy --strict (cwd the project root: the project's settings apply), then
                        run as a script; each `# -> TEXT` comment is a line it must print, in
                        order; a Litestar `app` it defines is served with Litestar's TestClient,
                        and GET / must answer 200 "hello" (with RateLimit-Remaining counting
                        down, where it is rate-limited)
    python continues    the same, on the page's previous python block followed by this one
    console             each `$ COMMAND` (a line ending in `\\` goes on) runs in bash and must
                        exit 0, printing (stdout and stderr) the lines that follow it up to the
                        next `$ `: runs of spaces and line breaks count as one space, and `...`
                        matches anything
    sh                  the block runs as one bash script (-euo pipefail), which must exit 0
    toml                an auth file: the server's own reader (load_tokens) must take it
    text tree           the code layout: every path it names exists, and it names every
                        module of server/, client/, wire/ and bench/ (but __init__.py)
    text errors         the StoreError tree: its classes are nestkv.client's StoreError and
                        every subclass, each under its base, "(also a X)" naming exactly the
                        built-in exceptions it also derives from
    LANG not-run        not run, on purpose: what a test cannot run (a command that serves
                        until stopped, `make test` itself, an openssl recipe, a cluster); a
                        `python not-run` block is still type-checked

Any other block fails: a new block is run, checked, or marked not-run on purpose.

Where blocks run: two servers are started for the module, a plaintext one, which
`127.0.0.1:50051` in a block stands for ($NESTKV_TARGET names it too), and one with mutual TLS
and an auth file, which `localhost:50051` stands for, $NESTKV_TOKEN holding a readwrite token
of it rooted at ["tenant-a"]. Both are emptied before each block. Each block runs in a fresh
directory holding ca.crt, server.crt, server.key, client.crt and client.key (the names the
openssl recipe of docs/security.md gives them), with this Python's `nestkv` and
`nestkv-server` first on PATH. docs/testing.md says the same for the pages' readers.

The module also checks that every link between the pages leads to a file, and to a heading of
it, that exist; and that the README stays the front door a newcomer starts from.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import nestkv.client
from nestkv.client import GrpcStore, StoreError
from nestkv.server.limits import Limits
from nestkv.server.security import load_tokens
from tests.pki import AuthFile, Pki, make_pki
from tests.serverproc import ServerProcess

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

PLAINTEXT = "127.0.0.1:50051"
"""What a block names the plaintext server by: `make serve`'s address."""
SECURE = "localhost:50051"
"""What a block names the server with mutual TLS and tokens by: a name its certificate holds."""

TIMEOUT = 120.0
EXPECTED = re.compile(r"# -> (.*)$", re.M)
SERVED = "--- served ---"
# Runs a python block as __main__; then serves the Litestar app it defines, if any.
RUNNER = f"""
import json, runpy, sys

namespace = runpy.run_path(sys.argv[1], run_name="__main__")
app = namespace.get("app")
if app is not None:
    from litestar.testing import TestClient

    print({SERVED!r}, flush=True)
    with TestClient(app) as client:
        for _ in range(3):
            response = client.get("/")
            answer = [response.status_code, response.text, response.headers.get("ratelimit-remaining")]
            print(json.dumps(answer), flush=True)
"""


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its info string and its text."""

    page: Path
    line: int
    """The line of its opening fence, from 1."""
    info: tuple[str, ...]
    text: str
    previous: Block | None
    """The page's python block before it, which a `python continues` block goes on from."""

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        """What the test does with it (see the module), or "" if it does not know."""
        if len(self.info) == 2 and self.info[1] == "not-run":
            return "python not-run" if self.info[0] == "python" else "not-run"
        kinds = {
            ("python",): "python",
            ("python", "continues"): "python",
            ("console",): "console",
            ("sh",): "sh",
            ("toml",): "toml",
            ("text", "tree"): "tree",
            ("text", "errors"): "errors",
        }
        return kinds.get(self.info, "")

    @property
    def source(self) -> str:
        """The text, after the previous python block's for `python continues`."""
        if self.info[1:] != ("continues",):
            return self.text
        assert self.previous is not None, f"{self.name}: `python continues` with no python block before it"
        return self.previous.source + "\n\n" + self.text

    @property
    def module(self) -> str:
        """A module name for the block's source, unique among the pages' blocks."""
        return f"{self.page.stem.lower()}_{self.line}"


FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def blocks_of(page: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = page.read_text().split("\n")
    previous: Block | None = None
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        start, indent, fence = number, len(opening["indent"]), opening["fence"]
        body: list[str] = []
        while number < len(lines) and not re.fullmatch(
            rf" *{re.escape(fence[0])}{{{len(fence)},}} *", lines[number]
        ):
            body.append(lines[number][indent:] if lines[number][:indent].isspace() else lines[number])
            number += 1
        assert number < len(lines), f"{page.name}:{start}: a code block that is never closed"
        number += 1
        block = Block(
            page, start, tuple(opening["info"].split()), "".join(f"{line}\n" for line in body), previous
        )
        if block.info[:1] == ("python",):
            previous = block
        blocks.append(block)
    return blocks


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def outside_code(page: Path) -> str:
    """The page's text with its code blocks blanked out (a `#` in a shell comment is no heading)."""
    lines = page.read_text().split("\n")
    for block in blocks_of(page):
        for index in range(block.line - 1, block.line + block.text.count("\n") + 1):
            lines[index] = ""
    return "\n".join(lines)


@dataclass(frozen=True)
class Servers:
    plaintext: ServerProcess
    secure: ServerProcess
    pki: Pki
    token: str

    @property
    def files(self) -> list[Path]:
        """What the openssl recipe of docs/security.md makes (but the CA's key)."""
        pki = self.pki
        return [pki.ca.cert, pki.server.cert, pki.server.key, pki.client.cert, pki.client.key]

    def substitute(self, text: str) -> str:
        return text.replace(PLAINTEXT, self.plaintext.target).replace(SECURE, f"localhost:{self.secure.port}")

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "NESTKV_TARGET": self.plaintext.target,
            "NESTKV_TOKEN": self.token,
        }

    async def empty(self) -> None:
        async with GrpcStore.with_client(self.plaintext.target) as store:
            await store.delete_all()
        credentials = self.pki.credentials(client=self.pki.client)
        async with GrpcStore.with_client(
            self.secure.target, credentials=credentials, token=self.token
        ) as store:
            await store.delete_all()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("docs-pki")
    pki = make_pki(directory)
    auth_file = AuthFile(directory / "tokens.toml")
    token = auth_file.mint("tenant-a", ["tenant-a"], "readwrite")
    tls = [
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca.cert),
    ]
    with ServerProcess() as plaintext, ServerProcess(*tls, "--auth-file", str(auth_file.path)) as secured:
        yield Servers(plaintext, secured, pki, token)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """mypy --strict's errors for each python block, by block name: one run for them all."""
    directory = tmp_path_factory.mktemp("docs-mypy")
    files: dict[str, Path] = {}
    for block in BLOCKS:
        if block.kind in ("python", "python not-run"):
            files[block.name] = directory / f"{block.module}.py"
            files[block.name].write_text(block.source)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *map(str, files.values())],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,  # the project's mypy settings: nestkv's sources on mypy_path
    )
    assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 2: mypy itself failed
    return {
        name: "\n".join(line for line in checked.stdout.splitlines() if line.startswith(str(path)))
        for name, path in files.items()
    }


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
async def test_block(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    kind = block.kind
    if not kind:
        pytest.fail(
            f"{block.name}: a ```{' '.join(block.info)} block is neither run, checked nor marked "
            "not-run: give it an info string tests/test_docs.py knows (see its docstring)"
        )
    if kind == "not-run":
        return
    if kind.startswith("python"):
        errors: dict[str, str] = request.getfixturevalue("mypy_errors")
        assert not errors[block.name], f"{block.name} fails mypy --strict:\n{errors[block.name]}"
        if kind == "python not-run":
            return
    if kind == "toml":
        check_auth_file(block, tmp_path)
        return
    if kind == "tree":
        check_tree(block)
        return
    if kind == "errors":
        check_errors(block)
        return
    servers: Servers = request.getfixturevalue("servers")
    for file in servers.files:
        shutil.copy(file, tmp_path / file.name)
    await servers.empty()
    # The block runs in processes of its own; this test waits for them in a thread.
    if kind == "python":
        await asyncio.to_thread(run_python, block, servers, tmp_path)
    elif kind == "console":
        await asyncio.to_thread(run_console, block, servers, tmp_path)
    else:
        assert kind == "sh", kind
        await asyncio.to_thread(run_sh, block, servers, tmp_path)


def run_sh(block: Block, servers: Servers, directory: Path) -> None:
    ran = run(["bash", "-euo", "pipefail", "-c", servers.substitute(block.text)], servers, directory)
    assert ran.returncode == 0, f"{block.name} exits {ran.returncode}:\n{ran.stdout}"


def run(
    command: list[str], servers: Servers, directory: Path, *, stderr: int = subprocess.STDOUT
) -> subprocess.CompletedProcess[str]:
    """`command` run in `directory`, its output in stdout: with stderr, as a terminal shows it."""
    return subprocess.run(
        command,
        cwd=directory,
        env=servers.environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def run_python(block: Block, servers: Servers, directory: Path) -> None:
    script = directory / f"{block.module}.py"
    script.write_text(servers.substitute(block.source))
    ran = run([sys.executable, "-c", RUNNER, str(script)], servers, directory, stderr=subprocess.PIPE)
    assert ran.returncode == 0, f"{block.name} exits {ran.returncode}:\n{ran.stdout}{ran.stderr}"
    printed, _, served = ran.stdout.partition(SERVED + "\n")
    expected = [line.rstrip() for line in EXPECTED.findall(block.source)]
    assert printed.splitlines() == expected, f"{block.name} printed this, not its `# -> ` lines"
    if not served:
        assert "\napp = " not in block.source, f"{block.name}: its app was not served"
        return
    answers = [json.loads(line) for line in served.splitlines()]
    assert [answer[:2] for answer in answers] == [[200, "hello"]] * 3, answers
    remaining = [answer[2] for answer in answers]
    if remaining != [None] * 3:  # rate-limited: counted on the server, one request at a time
        first = int(remaining[0])
        assert remaining == [str(first), str(first - 1), str(first - 2)], remaining


def commands_of(block: Block) -> list[tuple[str, str]]:
    """The `$ ` commands of a console block, each with the text shown after it."""
    commands: list[tuple[str, list[str]]] = []
    going_on = False
    for line in block.text.splitlines():
        if going_on:
            commands[-1] = (commands[-1][0] + "\n" + line, [])
        elif line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            assert commands, f"{block.name}: a console block starts with a `$ ` command"
            commands[-1][1].append(line)
        going_on = bool(commands) and not commands[-1][1] and line.endswith("\\")
    return [(command, "\n".join(shown)) for command, shown in commands]


def shows(expected: str, printed: str) -> bool:
    """Whether `printed` is what `expected` shows, runs of whitespace as one space, `...` anything."""
    pieces = [re.escape(" ".join(piece.split())) for piece in " ".join(expected.split()).split("...")]
    return re.fullmatch(".*?".join(pieces), " ".join(printed.split()), re.S) is not None


def run_console(block: Block, servers: Servers, directory: Path) -> None:
    for command, expected in commands_of(block):
        ran = run(["bash", "-c", servers.substitute(command)], servers, directory)
        assert ran.returncode == 0, f"{block.name}: `{command}` exits {ran.returncode}:\n{ran.stdout}"
        assert shows(expected, ran.stdout), (
            f"{block.name}: `{command}` printed\n{ran.stdout}\nwhere the block shows\n{expected}"
        )


def check_auth_file(block: Block, directory: Path) -> None:
    path = directory / "tokens.toml"
    path.write_text(block.text)
    grants, _ = load_tokens(str(path), Limits(), None)
    assert grants, f"{block.name}: an auth file with no tokens"


def check_tree(block: Block) -> None:
    """Every path named exists; every module is named. A name is what a line holds before its
    description (two spaces on); each two spaces of indent go one folder down; a line indented
    past the names continues the description above it."""
    named: set[Path] = set()
    folders: list[Path] = []
    for line in block.text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= 20:
            continue
        assert indent % 2 == 0, f"{block.name}: {line!r} is indented by {indent} spaces, not a level"
        level = indent // 2
        assert level <= len(folders), f"{block.name}: {line!r} is indented below no folder"
        folders = folders[:level]
        for name in line.strip().split("  ")[0].split(", "):
            path = (folders[-1] if folders else ROOT) / name
            assert path.exists(), f"{block.name}: {path.relative_to(ROOT)} does not exist"
            named.add(path)
            if name.endswith("/"):
                folders.append(path)
    modules = {
        path
        for folder in ("server/nestkv/server", "client/nestkv/client", "wire/nestkv/wire", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "__init__.py" and "_pb2" not in path.name
    }
    unnamed = sorted(str(path.relative_to(ROOT)) for path in modules - named)
    assert not unnamed, f"{block.name} does not name {unnamed}"


def check_errors(block: Block) -> None:
    """The tree of StoreError and its subclasses, as nestkv.client exports them."""
    parents: dict[str, str | None] = {}
    also: dict[str, set[str]] = {}
    stack: list[str] = []
    current = ""
    for line in block.text.splitlines():
        root = re.fullmatch(r"(\w+)", line.strip())
        branch = re.match(r"^([ │]*)[├└]── (\w+)", line)
        if root and not stack:
            current, depth = root[1], 0
        elif branch:
            current, depth = branch[2], len(branch[1]) // 4 + 1
        else:
            also[current] |= set(re.findall(r"\(also an? (\w+)\)", line))
            continue
        stack = [*stack[:depth], current]
        parents[current] = stack[-2] if depth else None
        also[current] = set(re.findall(r"\(also an? (\w+)\)", line))

    def subclasses(cls: type[StoreError]) -> list[type[StoreError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    classes = {cls.__name__: cls for cls in subclasses(StoreError)}
    assert set(parents) == set(classes), f"{block.name} shows {sorted(parents)}, not {sorted(classes)}"
    for name, cls in classes.items():
        assert getattr(nestkv.client, name) is cls, f"nestkv.client does not export {name}"
        bases = {base.__name__ for base in cls.__bases__ if base.__module__ != "builtins"}
        shown = {parents[name]} if parents[name] else {"Exception"}
        assert bases <= shown, f"{block.name} shows {name} under {parents[name]}, its bases are {bases}"
        built_in = {base.__name__ for base in cls.__bases__ if base.__module__ == "builtins"} - {"Exception"}
        assert built_in == also[name], (
            f"{block.name}: {name} is also {built_in or 'nothing'}, not {also[name]}"
        )
        assert all(isinstance(getattr(builtins, other), type) for other in built_in)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", outside_code(page), re.M):
        base = slug(heading)
        anchor, count = base, 0
        while anchor in found:
            count += 1
            anchor = f"{base}-{count}"
        found.add(anchor)
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", outside_code(page)):
        if re.match(r"[a-z]+:", target):
            continue  # https: and the like, not checked here
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no {path}")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_is_a_front_door_that_leads_to_every_page() -> None:
    """Issue 31: a newcomer reads what nestkv is, the two commands and a quickstart, in that
    order, then finds every docs/ page; the internals live there."""
    text = outside_code(README)
    sections = re.findall(r"^(#{2,3}) (.+)$", text, re.M)
    assert sections == [
        ("##", "Two commands"),
        ("##", "Quickstart"),
        ("###", "Python client"),
        ("###", "Litestar"),
        ("###", "Command line"),
        ("###", "Other languages"),
        ("##", "Where to go next"),
    ]
    assert README.read_text().count("\n") < 300
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text[text.index("## Where to go next") :]))
    pages = {str(page.relative_to(ROOT)) for page in PAGES if page != README}
    assert pages <= linked, f"Where to go next does not link {sorted(pages - linked)}"
    # The two commands are the Makefile's, and CI's one command is `make test`.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: .*\n\t\$\(BIN\)/python -m nestkv.server ", makefile, re.M)
    assert re.search(r"^test: lint typecheck installed ", makefile, re.M)
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\nmake test")
