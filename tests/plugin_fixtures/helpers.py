"""Helpers shared by tests/test_registry*.py and tests/test_cli_plugins.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
_installed: dict[str, Path] = {}


def install_test_plugins(tmp_root: Path) -> Path:
    """`pip install --no-deps --target` the `engine-test-plugins` package once per
    session; returns the target folder (put it on PYTHONPATH)."""
    if "target" not in _installed:
        source = tmp_root / "ep_pkg"
        shutil.copytree(HERE / "ep_pkg", source)
        target = tmp_root / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "--no-index", "--target", str(target), str(source)],
            check=True,
            capture_output=True,
        )
        _installed["target"] = target
    return _installed["target"]


def write_manifest(folder: Path, filename: str, plugins: list[dict], package: str = "") -> Path:
    """Write a schema-version 1 manifest with the given [[plugin]] tables."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["schema-version = 1", ""]
    if package:
        lines += ["[package]", textwrap.dedent(package).strip(), ""]
    for plugin in plugins:
        lines.append("[[plugin]]")
        for key, value in plugin.items():
            text = ("true" if value else "false") if isinstance(value, bool) else f'"{value}"'
            lines.append(f"{key} = {text}")
        lines.append("")
    path = folder / filename
    path.write_text("\n".join(lines))
    return path


def write_module(folder: Path, name: str, source: str) -> Path:
    """Write `folder/name.py`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def run_python(code: str, env: dict[str, str], cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -c code` in a child process; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, cwd=cwd or os.getcwd(), capture_output=True, text=True, timeout=120,
    )


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `python -m engine ARGS` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )
