"""The import rules of docs/architecture.md, checked on the source (AST: imports
inside functions count as much as those at the top of a file)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".venv", "node_modules"}

# files that test or time the registry's internals themselves, and so may import
# its private modules: its own unit tests (private state reset, a future engine
# version simulated, the TOML parser fuzzed) and the cold-discovery benchmark
# (clears the parser's line cache between rounds)
WHITE_BOX = ("tests/test_registry*.py", "benchmarks/bench_registry.py")


def python_files(root: Path) -> Iterator[Path]:
    """Every .py file under `root`, outside build and VCS folders."""
    for path in sorted(root.rglob("*.py")):
        if not SKIP_DIRS & set(path.relative_to(REPO).parts):
            yield path


def imports(path: Path, root: Path = REPO) -> Iterator[tuple[int, str]]:
    """(line, imported name) for every import statement in the file at `path`
    (under `root`), wherever it sits; ``from a import b`` yields ``a.b`` (b may be
    a module), a relative import is made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - (node.level - 1)]
                base = ".".join((*parent, base) if base else parent)
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"


def _private_registry_name(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "registry" and any(part.startswith("_") and part != "__version__"
                                           for part in parts[1:2])


def test_no_private_registry_import_outside_the_registry():
    offenders = []
    for path in python_files(REPO):
        rel = path.relative_to(REPO)
        if rel.parts[0] == "registry" or any(rel.match(p) for p in WHITE_BOX):
            continue
        offenders += [f"{rel}:{line}: {name}" for line, name in imports(path)
                      if _private_registry_name(name)]
    assert not offenders, ("private registry modules imported outside registry/ (use the "
                           "public names of `registry`):\n" + "\n".join(offenders))


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "engine" / "sample.py"
    sample.parent.mkdir()
    sample.write_text("def f():\n    from registry._env import strict_mode\n"
                      "    import registry._loading as loading\n"
                      "    from registry import _discovery, discover\n"
                      "    from .sibling import x\n")
    names = [name for _, name in imports(sample, tmp_path)]
    assert [n for n in names if _private_registry_name(n)] == [
        "registry._env.strict_mode", "registry._loading", "registry._discovery"]
    assert "engine.sibling.x" in names


def test_registry_imports_nothing_from_engine():
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}"
                 for path in python_files(REPO / "registry")
                 for line, name in imports(path)
                 if name == "engine" or name.startswith("engine.")]
    assert not offenders, "registry/ must not import engine:\n" + "\n".join(offenders)
