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


def python_files(folder: Path) -> Iterator[Path]:
    """Every .py file under `folder`, outside build and VCS folders."""
    for path in sorted(folder.rglob("*.py")):
        if not SKIP_DIRS & set(path.relative_to(folder).parts):
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


# ---------------------------------------------------------------------------
# the import graph of engine/ and registry/


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO, packages: tuple[str, ...] = ("engine", "registry")
                 ) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in the file (an import of
    ``a.b.c`` where ``c`` is a name, not a module, is an edge to ``a.b``)."""
    files = {_module_name(p, root): p for top in packages for p in python_files(root / top)}

    def module_of(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in files:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = {module_of(name) for _, name in imports(path, root)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's
    algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_among_engine_and_registry_modules():
    found = circles(import_graph())
    assert not found, (
        "import circles (imports inside functions count): move what both sides need "
        "into a module of its own\n" + "\n".join(" <-> ".join(c) for c in found))


def test_the_circle_check_finds_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from engine.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from engine import a\n")
    (pkg / "c.py").write_text("import engine.a\n")
    assert circles(import_graph(tmp_path, ("engine",))) == [["engine.a", "engine.b"]]
