"""Checking manifests before they are installed (`engine plugins validate`): the
schema, the ownership and permission rule discovery applies, and, on request,
importing every value they name."""

from __future__ import annotations

import os

from registry._errors import ManifestError
from registry._loading import import_plugin
from registry._manifest import load_manifest, load_pyproject_entry_points, validate_manifest
from registry._records import PluginRecord
from registry._sources import (
    manifest_code_path,
    manifest_files,
    project_code_path,
    records_from_manifest,
    records_from_project,
    trust_problems,
    unsafe_reason,
)

PYPROJECT = "pyproject.toml"


def _files_to_check(path: str) -> tuple[list[str], list[str]]:
    """The manifest files `path` names (a file, or a folder's ``*.toml`` and its
    ``pyproject.toml``), and the problem when it names none."""
    if os.path.isdir(path):
        files = manifest_files(path)
        project = os.path.join(path, PYPROJECT)
        if os.path.isfile(project):
            files.append(project)
        return files, ([] if files else [f"{path}: no *.toml manifests in this folder"])
    if os.path.exists(path):
        return [path], []
    return [], [f"{path}: no such file or folder"]


def _trust_problems(path: str) -> list[str]:
    """Discovery's ownership and permission rule for one manifest or pyproject.toml:
    the file, its folder, a symlink's real folder and the folder its code is
    imported from."""
    folder = os.path.dirname(os.path.abspath(path))
    problems = []
    for what, where in (("the file", path), ("its folder", folder)):
        try:
            reason = unsafe_reason(os.stat(where), what)
        except OSError:
            reason = None
        if reason:
            problems.append(f"{path}: refused: {reason}; manifests run code, so fix the "
                            "permissions")
    sys_path: str | None
    if os.path.basename(path) == PYPROJECT:
        sys_path = project_code_path(path)
    else:
        sys_path = manifest_code_path(path, load_manifest(path))
    return problems + [f"{path}: {line}" for line in trust_problems(path, sys_path)]


def _import_problems(path: str) -> list[str]:
    """Import every plugin value a valid manifest or pyproject names; one line per
    failure, naming the field that holds the value."""
    places: list[tuple[str, PluginRecord]]
    if os.path.basename(path) == PYPROJECT:
        places = [(f'project.entry-points."{r.group}".{r.name}', r)
                  for r in records_from_project(path, load_pyproject_entry_points(path))]
    else:
        records = records_from_manifest(path, load_manifest(path), "plugin-dir")
        places = [(f"plugin[{i}].value", r) for i, r in enumerate(records)]
    problems = []
    for place, record in places:
        try:
            import_plugin(record)
        except Exception as exc:
            problems.append(
                f"{path}: {place}: cannot import {record.value!r}: {type(exc).__name__}: {exc}"
            )
    return problems


def check_manifest(path: str, *, import_values: bool = False) -> list[str]:
    """The problems of one manifest or plugin project's ``pyproject.toml``, one line
    each (empty: fine): its schema, then (when valid) the ownership and permission
    rule discovery applies to it, then (with `import_values`, when that passed)
    importing every plugin value it names. Plugin code runs only with
    `import_values`."""
    problems = validate_manifest(path)
    if not problems:
        try:
            problems = _trust_problems(path)
        except ManifestError as exc:  # changed since it was validated
            problems = exc.problems
    if not problems and import_values:
        problems = _import_problems(path)
    return problems


def check_manifests(paths: list[str] | tuple[str, ...], *,
                    import_values: bool = False) -> list[tuple[str, list[str]]]:
    """Check every manifest the `paths` name (files; folders: their ``*.toml`` and
    ``pyproject.toml``) with `check_manifest`.

    Returns ``(file, problems)`` in order, ``problems`` empty for a good file; a
    path that names no manifest yields ``(path, [its problem])``.
    """
    results: list[tuple[str, list[str]]] = []
    for path in paths:
        files, problems = _files_to_check(path)
        if problems:
            results.append((path, problems))
        results += [(file, check_manifest(file, import_values=import_values)) for file in files]
    return results
