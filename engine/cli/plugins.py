"""`engine plugins ...`: list, validate, diagnose, disable/enable and test plugins,
and print the manifest schema.

Nothing here imports torch at module level; `list`, `validate` (without --import)
and `schema` never import plugin code (`list --json` imports only the settings
model a manifest names with `config =`, to show the validated settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

ACTIONS = ("list", "validate", "doctor", "schema", "test", "disable", "enable")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the `plugins` subcommand and its actions to the `engine` parser."""
    parser = subparsers.add_parser(
        "plugins",
        parents=parents,
        help="list, validate and diagnose plugins",
        description="Inspect the plugins the engine would load, and why.",
    )
    parser.set_defaults(func=run, plugins_parser=parser)
    actions = parser.add_subparsers(dest="plugins_action", metavar="ACTION")

    p = actions.add_parser(
        "list", parents=parents, help="every discovered plugin, its source and state"
    )
    p.add_argument("--group", metavar="G", help="only this group (alias or full name)")
    p.add_argument("--json", action="store_true", help="print a JSON array on stdout")

    p = actions.add_parser("validate", parents=parents, help="check manifest files")
    p.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="manifest, pyproject.toml, or a folder of them",
    )
    p.add_argument(
        "--import", dest="import_values", action="store_true",
        help="also import every plugin value the manifests name",
    )

    p = actions.add_parser(
        "doctor", parents=parents,
        help="validate and import everything, report conflicts, settings, effects and "
        "the platform choice",
    )
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (keys: engine, problems, sections, effects)")
    actions.add_parser("schema", parents=parents, help="print the manifest JSON Schema")

    for action, verb in (("disable", "never load"), ("enable", "load again")):
        p = actions.add_parser(
            action, parents=parents,
            help=f"{verb} plugin NAME from now on (persisted in the config dir)",
        )
        p.add_argument("name", metavar="NAME", help="the plugin's name")
        p.add_argument("--group", metavar="G", help="only in this group (default: every group)")

    p = actions.add_parser("test", parents=parents,
                           help="run the conformance kit's checks on one plugin")
    p.add_argument("name", metavar="NAME", help="the plugin's name")
    p.add_argument("--group", metavar="G", help="only its checks in this group")
    p.add_argument("--json", action="store_true", help="print a JSON array of results")
    p.add_argument("-k", dest="keyword", metavar="EXPR",
                   help="only checks matching EXPR (substrings with and/or/not, as pytest -k)")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action; returns the exit code."""
    action = getattr(args, "plugins_action", None)
    if action is None:
        args.plugins_parser.print_help()
        return 2
    handler = {"list": run_list, "validate": run_validate, "doctor": run_doctor,
               "schema": run_schema, "test": run_test, "disable": run_disable,
               "enable": run_enable}[action]
    try:
        return handler(args)
    except BrokenPipeError:  # `engine plugins list | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


# ---------------------------------------------------------------------------
# list


def _table(rows: list[list[str]]) -> str:
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    line = "  ".join(f"{{:<{width}}}" for width in widths)
    return "\n".join(line.format(*row).rstrip() for row in rows)


def run_list(args: argparse.Namespace) -> int:
    """Print every discovered plugin (a table, or JSON with --json)."""
    from registry._discovery import current_discovery
    from registry._env import strict_mode
    from registry._groups import group_alias, resolve_group
    from registry._listing import plugin_note

    try:
        group = resolve_group(args.group) if args.group else None
    except ValueError as exc:
        print(f"engine plugins list: {exc}", file=sys.stderr)
        return 2
    discovery = current_discovery()
    records = [r for r in discovery.records if group is None or r.group == group]
    if args.json:
        from registry._listing import plugin_rows

        print(json.dumps(plugin_rows(group), indent=2))
    elif not records:
        print("no plugins found")
    else:
        rows = [["GROUP", "NAME", "SOURCE", "ENABLED", "VALUE", "ORIGIN", "NOTE"]]
        for r in records:
            rows.append([group_alias(r.group), r.name, r.source, "yes" if r.enabled else "no",
                         r.value, r.origin, plugin_note(r)])
        print(_table(rows))
    if discovery.problems and strict_mode():
        for problem in discovery.problems:  # strict mode raises instead of logging: say them
            print(f"engine plugins list: {problem.message}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# disable / enable


def _state_target(args: argparse.Namespace, action: str) -> tuple[str | None, list[Any]] | None:
    """The group (None: all) and the discovered records `args.name` matches; prints
    the error and returns None on a bad group or a builtin-only name."""
    from registry._discovery import current_discovery
    from registry._groups import resolve_group

    try:
        group = resolve_group(args.group) if args.group else None
    except ValueError as exc:
        print(f"engine plugins {action}: {exc}", file=sys.stderr)
        return None
    matches = [r for r in current_discovery().records
               if r.name == args.name and (group is None or r.group == group)]
    if action == "disable" and matches and all(r.source == "builtin" for r in matches):
        print(f"engine plugins disable: plugin {args.name!r} is built in, and builtin plugins "
              "cannot be disabled (choose another platform with --platform / ENGINE_PLATFORM)",
              file=sys.stderr)
        return None
    return group, matches


def run_disable(args: argparse.Namespace) -> int:
    """Persist that plugin NAME (of --group, else of every group) must not load."""
    from registry._state import read_disabled, write_disabled

    target = _state_target(args, "disable")
    if target is None:
        return 2
    group, matches = target
    disabled = set(read_disabled())
    disabled.add((group, args.name))
    path = write_disabled(disabled)
    where = f" ({group})" if group else ""
    print(f"disabled plugin {args.name!r}{where}; saved in {path}")
    if not matches:
        print(f"note: no plugin named {args.name!r} is known now; it stays disabled if one appears")
    elif any(r.source == "builtin" for r in matches):
        print("note: its builtin namesake is not affected (builtins cannot be disabled)")
    return 0


def run_enable(args: argparse.Namespace) -> int:
    """Undo `disable`: plugin NAME (of --group, else of every group) loads again."""
    from registry._state import read_disabled, write_disabled

    target = _state_target(args, "enable")
    if target is None:
        return 2
    group, _ = target
    disabled = set(read_disabled())
    before = len(disabled)
    disabled = {(g, n) for g, n in disabled
                if not (n == args.name and (group is None or g == group))}
    path = write_disabled(disabled)
    if len(disabled) == before:
        print(f"plugin {args.name!r} was not disabled")
    else:
        print(f"enabled plugin {args.name!r}; saved in {path}")
    if group is not None and (None, args.name) in disabled:
        print(f"note: {args.name!r} is still disabled in every group; run "
              f"`engine plugins enable {args.name}` without --group to undo that")
    return 0


# ---------------------------------------------------------------------------
# validate


def _files_to_validate(path: str) -> tuple[list[str], list[str]]:
    """The manifest files named by `path` (a file or folder), and problems."""
    from registry._sources import manifest_files

    if os.path.isdir(path):
        files = manifest_files(path)
        project = os.path.join(path, "pyproject.toml")
        if os.path.isfile(project):
            files.append(project)
        return files, ([] if files else [f"{path}: no *.toml manifests in this folder"])
    if os.path.exists(path):
        return [path], []
    return [], [f"{path}: no such file or folder"]


def _import_problems(path: str) -> list[str]:
    """Import every plugin a valid manifest or pyproject names; a line per failure."""
    from registry._loading import import_plugin
    from registry._manifest import load_manifest, load_pyproject_entry_points
    from registry._records import PluginRecord
    from registry._sources import _records_from_manifest

    if os.path.basename(path) == "pyproject.toml":
        folder = os.path.dirname(os.path.abspath(path))
        src = os.path.join(folder, "src")
        sys_path = src if os.path.isdir(src) else folder
        places = [
            (f'project.entry-points."{group}".{name}',
             PluginRecord(group, name, value, "plugin-dir", path, path=sys_path))
            for group, table in load_pyproject_entry_points(path).items()
            for name, value in table.items()
        ]
    else:
        records = _records_from_manifest(path, load_manifest(path), "plugin-dir")
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


def _trust_problems(path: str) -> list[str]:
    """The ownership/permission rule discovery applies, for one manifest or
    pyproject.toml: the file, its folder, a symlink's real folder and the folder its
    code is imported from."""
    from registry._manifest import load_manifest
    from registry._sources import trust_problems, unsafe_reason

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
    if os.path.basename(path) == "pyproject.toml":
        src = os.path.join(folder, "src")
        sys_path: str | None = src if os.path.isdir(src) else folder
    else:
        package = load_manifest(path).package
        sys_path = None
        if package is not None and package.path is not None:
            sys_path = os.path.normpath(os.path.join(folder, package.path))
    return problems + [f"{path}: {line}" for line in trust_problems(path, sys_path)]


def run_validate(args: argparse.Namespace) -> int:
    """Validate manifests: one line per problem; exit 0 only when all are valid."""
    from registry._manifest import validate_manifest

    failed = False
    for path in args.paths:
        files, problems = _files_to_validate(path)
        for line in problems:
            print(line)
            failed = True
        for file in files:
            problems = validate_manifest(file)
            if not problems:
                problems = _trust_problems(file)
            if not problems and args.import_values:
                problems = _import_problems(file)
            for line in problems:
                print(line)
            if problems:
                failed = True
            else:
                print(f"{file}: ok")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# doctor


def _check_shape(group: str, value: object) -> str | None:
    from registry._groups import (
        API_ROUTE_PLUGINS,
        LOGITS_PROCESSOR_PLUGINS,
        QUANTIZATION_PLUGINS,
        STAT_LOGGER_PLUGINS,
    )

    if group == QUANTIZATION_PLUGINS:
        return None if isinstance(value, type) else "value should be a QuantizationMethod subclass"
    if group == STAT_LOGGER_PLUGINS:
        return None if isinstance(value, type) else "value should be a StatLoggerBase subclass"
    if group == LOGITS_PROCESSOR_PLUGINS:
        return None if isinstance(value, type) else "value should be a LogitsProcessor subclass"
    if group == API_ROUTE_PLUGINS:  # an APIRouter itself, or a callable returning one
        return None
    return None if callable(value) else "value should be callable"


class _Report:
    """Doctor's findings, printed as they come (or kept for --json)."""

    def __init__(self, quiet: bool = False) -> None:
        self.problems = 0
        self.quiet = quiet
        self.sections: dict[str, list[dict[str, str]]] = {}
        self.current: list[dict[str, str]] = []

    def section(self, title: str) -> None:
        self.current = self.sections.setdefault(title, [])
        if not self.quiet:
            print(f"\n{title}")

    def _add(self, status: str, text: str) -> None:
        self.current.append({"status": status, "text": text})
        if not self.quiet:
            print(f"  {status if status != 'info' else '-':<8} {text}")

    def ok(self, text: str) -> None:
        self._add("ok", text)

    def info(self, text: str) -> None:
        self._add("info", text)

    def problem(self, text: str, label: str = "PROBLEM") -> None:
        self.problems += 1
        self._add(label, text)


def _doctor_discovery(report: _Report) -> list[Any]:
    import logging

    from registry._discovery import current_discovery
    from registry._env import config_dir, plugin_dirs

    discovery = current_discovery()
    report.section("Discovery")
    report.info(f"config dir: {os.path.join(config_dir(), 'plugins')}")
    report.info(f"plugin dirs: {', '.join(plugin_dirs()) or '(none)'}")
    allowed = os.environ.get("ENGINE_PLUGINS")
    shown = "(unset: everything allowed)" if allowed is None else repr(allowed)
    report.info(f"ENGINE_PLUGINS: {shown}")
    if os.environ.get("ENGINE_PLUGINS_AUTOLOAD") is not None:
        report.info(f"ENGINE_PLUGINS_AUTOLOAD: {os.environ['ENGINE_PLUGINS_AUTOLOAD']!r}")
    by_state = sorted({r.name for r in discovery.records if r.disabled_by == "state"})
    if by_state:
        report.info(f"disabled with `engine plugins disable`: {', '.join(by_state)}")
    enabled = sum(r.enabled for r in discovery.records)
    report.info(f"{len(discovery.records)} plugins found, {enabled} enabled, "
                f"in {discovery.seconds * 1000:.1f} ms")
    for problem in discovery.problems:
        report.problem(problem.message, logging.getLevelName(problem.level))
    report.section("Conflicts")
    shadowed = [r for r in discovery.records
                if (r.disabled_reason or "").startswith("shadowed")]
    for r in shadowed:
        report.info(f"{r.name} ({r.group}): {r.source} {r.origin} is {r.disabled_reason}")
    if not shadowed:
        report.ok("no plugin is provided twice")
    return list(discovery.records)


def _doctor_imports(report: _Report, records: list[Any]) -> None:
    from registry._groups import group_alias
    from registry._loading import import_plugin

    report.section("Imports")
    for r in records:
        label = f"{group_alias(r.group)}/{r.name} = {r.value} ({r.source} {r.origin})"
        if not r.enabled:
            report.info(f"{label}: not loaded: {r.disabled_reason}")
            continue
        try:
            value = import_plugin(r)
        except Exception as exc:
            report.problem(f"{label}: cannot import: {type(exc).__name__}: {exc}")
            continue
        shape = _check_shape(r.group, value)
        if shape:
            report.problem(f"{label}: {shape}")
        else:
            report.ok(label)


def _doctor_platform(report: _Report) -> None:
    import importlib
    import importlib.util

    report.section("Platform")
    try:
        available = importlib.util.find_spec("engine.platforms") is not None
    except ImportError:
        available = False
    if not available:
        report.info("platform check unavailable: engine.platforms is not installed")
        return
    try:
        platforms = importlib.import_module("engine.platforms")
    except Exception as exc:
        report.problem(f"cannot import engine.platforms: {type(exc).__name__}: {exc}")
        return
    dry_run = getattr(platforms, "dry_run_resolution", None)
    if dry_run is None:
        report.info("platform check unavailable: engine.platforms has no dry_run_resolution")
        return
    try:
        result = dry_run()
    except Exception as exc:
        report.problem(f"platform dry run raised {type(exc).__name__}: {exc}")
        return
    if result.chosen:
        report.ok(f"would choose {result.chosen!r} ({result.platform_cls})")
    else:
        report.problem("no platform would be chosen")
    report.info(f"why: {result.reason}")
    for problem in result.problems:
        report.problem(problem)


def run_doctor(args: argparse.Namespace) -> int:
    """Validate and import everything discovered, report conflicts and the platform
    that would be chosen; exit 1 on any problem."""
    import logging

    from registry._version import __version__

    # the report below prints every registry problem itself; don't say it twice
    logging.getLogger("registry").setLevel(logging.CRITICAL)
    as_json = getattr(args, "json", False)
    if not as_json:
        print(f"engine {__version__} plugin doctor (python {sys.version.split()[0]})")
    report = _Report(quiet=as_json)
    records = _doctor_discovery(report)
    _doctor_imports(report, records)
    _doctor_settings(report, records)
    _doctor_platform(report)
    effects = _doctor_effects(report)
    if as_json:
        print(json.dumps({"engine": __version__, "problems": report.problems,
                          "sections": report.sections, "effects": effects}, indent=2))
    else:
        print(f"\n{report.problems} problem(s) found" if report.problems
              else "\nno problems found")
    return 1 if report.problems else 0


def _doctor_settings(report: _Report, records: list[Any]) -> None:
    """Validate the settings of every enabled plugin that declares a model (manifest
    ``config`` or ``engine_config_model``) or was given values."""
    from registry._settings import (
        PluginConfigError,
        model_of,
        raw_plugin_config,
        redacted,
        validate_settings,
    )

    report.section("Settings")
    try:
        given = raw_plugin_config()
    except PluginConfigError as exc:
        for line in exc.problems:
            report.problem(line)
        given = {}
    known = {r.name for r in records}
    for name in sorted(set(given) - known):
        report.problem(f"plugin {name} config: (settings): no plugin named {name!r} is discovered")
    checked = 0
    for r in records:
        if not r.enabled:
            continue
        try:
            model = model_of(r)
        except Exception as exc:
            if r.config_model or r.name in given:
                report.problem(f"plugin {r.name} config: (settings): cannot load its settings "
                               f"model: {type(exc).__name__}: {exc}")
            continue
        if model is None:
            if r.name in given:
                report.problem(f"plugin {r.name} config: (settings): values were given, but "
                               "the plugin declares no settings model")
            continue
        checked += 1
        try:
            settings = validate_settings(r.name, model, given.get(r.name, {}))
        except PluginConfigError as exc:
            for line in exc.problems:
                report.problem(line)
            continue
        report.ok(f"{r.name}: {json.dumps(redacted(settings))}")
    if not checked and not given:
        report.info("no plugin declares settings")


def _doctor_effects(report: _Report) -> list[dict[str, Any]]:
    """Run the general plugins (as an engine start does) and list every registration
    made so far in this process, naming the plugin that made it."""
    import registry

    report.section("Effects")
    try:
        registry.load_general_plugins()
    except Exception as exc:  # strict mode: the failure is the report
        report.problem(f"general plugins: {exc}")
    for event in registry.load_trace():
        if event.outcome == "call-failed" and event.pid == os.getpid():
            report.problem(f"general plugin {event.name!r} ({event.source} {event.origin}) "
                           f"raised when called: {event.error}")
    effects = registry.effects()
    for effect in effects:
        replaced = f" (replaces {effect['replaced']}'s)" if effect["replaced"] else ""
        text = f"{effect['plugin']}: {effect['kind']} {effect['target']}{replaced}"
        if effect["replaced"] and effect["replaced"] != effect["plugin"]:
            report.problem(text, "WARNING")
        else:
            report.info(text)
    if not effects:
        report.info("no registrations recorded")
    return effects


# ---------------------------------------------------------------------------
# schema


def run_schema(args: argparse.Namespace) -> int:
    """Print the manifest JSON Schema (also in docs/manifest.schema.json)."""
    from registry import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))
    return 0


# ---------------------------------------------------------------------------
# test


def run_test(args: argparse.Namespace) -> int:
    """Run the conformance kit on one plugin (engine.testing; imports torch)."""
    from engine.testing._cli import run_test_command

    return run_test_command(args)
