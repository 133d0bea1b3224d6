"""Every fenced ```bash and ```python block of README.md and docs/*.md runs as written.

The marker convention (an HTML comment on the line just above the opening fence,
invisible on GitHub):

    <!-- doc-test: skip REASON -->   not run; REASON says what the test machine lacks
                                     (a GPU, a Ray cluster, the network, a model you
                                     bring, minutes of benchmark time, ...)
    <!-- doc-test: server -->        run while `engine serve` (the embedded default
                                     model) listens; ``127.0.0.1:8000`` in the block is
                                     rewritten to that server's address
    <!-- doc-test: continues -->     prepend the previous python block of the same file
                                     (a snippet that uses names the one before defined)

Anything else runs: python blocks in one child process (each in a fresh namespace and
a fresh empty working folder, so ``llm = LLM()`` and class definitions are checked),
bash blocks with ``bash -e`` in the repository root, ``engine`` meaning this checkout.
Blocks in other languages (toml, json, text) are not run. A new doc page is picked up
by the glob: give each of its bash/python blocks a runnable form or a marker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import subprocess_env
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|server|continues)\b\s*(.*?)\s*-->\s*$")
DEFAULT_ADDRESS = "127.0.0.1:8000"


@dataclass
class Snippet:
    path: Path
    line: int
    lang: str
    code: str
    marker: str | None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _snippets() -> list[Snippet]:
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        previous_python = ""
        for match in _FENCE.finditer(text):
            lang = match.group(1)
            if lang not in ("bash", "python"):
                continue
            line = text.count("\n", 0, match.start()) + 1
            above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            found = _MARKER.search(above)
            marker, reason = (found.group(1), found.group(2)) if found else (None, "")
            code = match.group(2)
            if marker == "continues":
                code = previous_python + code
            if lang == "python":
                previous_python = code
            out.append(Snippet(path, line, lang, code, marker, reason))
    return out


SNIPPETS = _snippets()
RUN = [s for s in SNIPPETS if s.marker != "skip"]


def test_every_skip_marker_says_why():
    unexplained = [s.id for s in SNIPPETS if s.marker == "skip" and len(s.reason) < 8]
    assert not unexplained, f"'doc-test: skip' needs a reason: {unexplained}"


# ------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_address(tmp_path_factory):
    """One `engine serve` of the default model for every server block (started only
    when some block needs it)."""
    if not any(s.marker == "server" for s in RUN):
        yield None
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("docs-serve") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port)],
                                env=subprocess_env(OMP_NUM_THREADS="1"), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        for _ in range(600):  # 120 s at most
            if proc.poll() is not None:
                pytest.fail(f"engine serve exited:\n{log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"engine serve not ready:\n{log.read_text()}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ python blocks

_RUNNER = r"""
import contextlib, io, json, os, sys, tempfile, traceback
blocks = json.load(open(sys.argv[1]))
results = {}
for key, code in blocks.items():
    folder = tempfile.mkdtemp(prefix="doc-snippet-", dir=sys.argv[3])
    os.chdir(folder)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, key, "exec"), {"__name__": "__main__"})
        results[key] = {"ok": True, "stdout": out.getvalue()}
    except BaseException:
        results[key] = {"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def python_results(server_address, tmp_path_factory):
    """Every python block run once, in one child process (one torch import)."""
    folder = tmp_path_factory.mktemp("docs-python")
    blocks = {}
    for s in RUN:
        if s.lang == "python":
            code = s.code
            if s.marker == "server":
                code = code.replace(DEFAULT_ADDRESS, server_address)
            blocks[s.id] = code
    (folder / "blocks.json").write_text(json.dumps(blocks))
    (folder / "runner.py").write_text(_RUNNER)
    proc = subprocess.run(
        [sys.executable, str(folder / "runner.py"), str(folder / "blocks.json"),
         str(folder / "results.json"), str(folder)],
        capture_output=True, text=True, timeout=600,
        env=subprocess_env(OMP_NUM_THREADS="1", ENGINE_CPU_KERNELS="0"))
    assert proc.returncode == 0, proc.stderr
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("snippet", [s for s in RUN if s.lang == "python"], ids=lambda s: s.id)
def test_python_block_runs(snippet, python_results):
    result = python_results[snippet.id]
    assert result["ok"], f"{snippet.id}:\n{result['error']}"


# ------------------------------------------------------------------ bash blocks


@pytest.fixture(scope="module")
def engine_on_path(tmp_path_factory) -> str:
    """A folder with an `engine` command that runs this checkout."""
    folder = tmp_path_factory.mktemp("bin")
    shim = folder / "engine"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m engine "$@"\n')
    shim.chmod(0o755)
    return str(folder)


@pytest.mark.parametrize("snippet", [s for s in RUN if s.lang == "bash"], ids=lambda s: s.id)
def test_bash_block_runs(snippet, engine_on_path, server_address):
    code = snippet.code
    if snippet.marker == "server":
        code = code.replace(DEFAULT_ADDRESS, server_address)
    env = subprocess_env(PATH=engine_on_path + os.pathsep + os.environ["PATH"],
                         ENGINE_CPU_KERNELS="0")
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{snippet.id}:\n{proc.stdout}\n{proc.stderr}"


# ------------------------------------------------------------------ the install commands


def _readme_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [m.group(2) for m in _FENCE.finditer(readme) if m.group(1) == "bash"]
    return [shlex.split(part) for block in blocks for part in block.strip().split(" && ")]


def test_the_stock_machine_install_gets_the_cpu_torch_the_engine_accepts():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pin = next(Requirement(line.strip().strip('",'))
               for line in pyproject.splitlines() if line.strip().startswith('"torch'))
    commands = _readme_commands()
    # the commands that work here are unchanged (CI runs the second one verbatim)
    assert ["python3", "-m", "pip", "install", "-q", "torch==2.13.0", "-e", "."] in commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m pip install -q torch==2.13.0 -e '.[test]' && python3 -m pytest -q -n 2 --dist loadfile" in ci
    stock = [c for c in commands if "--index-url" in c]
    assert len(stock) == 1, "the README gives one stock-machine torch install"
    cmd = stock[0]
    assert cmd[:4] == ["python3", "-m", "pip", "install"]
    assert cmd[cmd.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    torch_req = next(Requirement(a) for a in cmd if a.startswith("torch"))
    assert str(torch_req.specifier) == str(pin.specifier) == "==2.13.0"
    # what that index serves is a local version: the engine's own pin accepts it, so
    # the `pip install -e` that follows keeps it instead of fetching the CUDA build
    assert SpecifierSet(str(pin.specifier)).contains("2.13.0+cpu")
    index = commands.index(cmd)
    assert commands[index + 1][:4] == ["python3", "-m", "pip", "install"]
    assert "-e" in commands[index + 1]
    assert "is the CPU build" not in (ROOT / "README.md").read_text(encoding="utf-8")
