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

from engine.cli.common import for_stdout

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
    # names, values and origins come from installed packages and manifest paths:
    # shown, never obeyed, on a terminal (escaped before the widths are measured)
    rows = [[for_stdout(cell) for cell in row] for row in rows]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    line = "  ".join(f"{{:<{width}}}" for width in widths)
    return "\n".join(line.format(*row).rstrip() for row in rows)


def run_list(args: argparse.Namespace) -> int:
    """Print every discovered plugin (a table, or JSON with --json)."""
    import registry
    from engine.entrypoints.plugin_listing import plugin_note, plugin_rows

    try:
        group = registry.resolve_group(args.group) if args.group else None
    except ValueError as exc:
        print(f"engine plugins list: {exc}", file=sys.stderr)
        return 2
    discovery = registry.current_discovery()
    records = [r for r in discovery.records if group is None or r.group == group]
    if args.json:
        print(json.dumps(plugin_rows(group), indent=2))
    elif not records:
        print("no plugins found")
    else:
        rows = [["GROUP", "NAME", "SOURCE", "ENABLED", "VALUE", "ORIGIN", "NOTE"]]
        for r in records:
            rows.append([registry.group_alias(r.group), r.name, r.source,
                         "yes" if r.enabled else "no", r.value, r.origin, plugin_note(r)])
        print(_table(rows))
    if discovery.problems and registry.strict_mode():
        for problem in discovery.problems:  # strict mode raises instead of logging: say them
            print(f"engine plugins list: {problem.message}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# disable / enable


def _group_of(args: argparse.Namespace, action: str) -> tuple[bool, str | None]:
    """(True, full group or None for every group), or (False, None) after printing
    why --group is not a group."""
    import registry

    try:
        return True, registry.resolve_group(args.group) if args.group else None
    except ValueError as exc:
        print(f"engine plugins {action}: {exc}", file=sys.stderr)
        return False, None


def run_disable(args: argparse.Namespace) -> int:
    """Persist that plugin NAME (of --group, else of every group) must not load."""
    import registry

    valid, group = _group_of(args, "disable")
    if not valid:
        return 2
    try:
        change = registry.disable_plugin(args.name, group)
    except registry.BuiltinPluginError as exc:
        print(f"engine plugins disable: {exc} (choose another platform with --platform / "
              "ENGINE_PLATFORM)", file=sys.stderr)
        return 2
    except registry.PluginStateError as exc:
        print(f"engine plugins disable: error: {exc}", file=sys.stderr)
        return 1
    where = f" ({group})" if group else ""
    print(f"disabled plugin {args.name!r}{where}; saved in {change.path}")
    if not change.matches:
        print(f"note: no plugin named {args.name!r} is known now; it stays disabled if one appears")
    elif any(r.source == "builtin" for r in change.matches):
        print("note: its builtin namesake is not affected (builtins cannot be disabled)")
    return 0


def run_enable(args: argparse.Namespace) -> int:
    """Undo `disable`: plugin NAME (of --group, else of every group) loads again."""
    import registry

    valid, group = _group_of(args, "enable")
    if not valid:
        return 2
    try:
        change = registry.enable_plugin(args.name, group)
    except registry.PluginStateError as exc:
        print(f"engine plugins enable: error: {exc}", file=sys.stderr)
        return 1
    if change.changed:
        print(f"enabled plugin {args.name!r}; saved in {change.path}")
    else:
        print(f"plugin {args.name!r} was not disabled")
    if change.disabled_everywhere:
        print(f"note: {args.name!r} is still disabled in every group; run "
              f"`engine plugins enable {args.name}` without --group to undo that")
    return 0


# ---------------------------------------------------------------------------
# validate


def run_validate(args: argparse.Namespace) -> int:
    """Validate manifests: one line per problem; exit 0 only when all are valid."""
    import registry

    failed = False
    for file, problems in registry.check_manifests(args.paths, import_values=args.import_values):
        for line in problems:
            print(for_stdout(line))
        failed = failed or bool(problems)
        if not problems:
            print(f"{file}: ok")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# doctor


def _platform_section(report: Any) -> None:
    """The platform the engine would choose, and why (a dry run: nothing is
    initialised)."""
    from engine.platforms import dry_run_resolution

    report.section("Platform")
    try:
        result = dry_run_resolution()
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


def _print_line(status: str, text: str) -> None:
    # a plugin's own text (an import error's message) is shown, never obeyed
    print(f"  {status if status != 'info' else '-':<8} {for_stdout(text)}")


def run_doctor(args: argparse.Namespace) -> int:
    """Validate and import everything discovered, report conflicts and the platform
    that would be chosen; exit 1 on any problem."""
    import logging

    import registry

    # the report below prints every registry problem itself; don't say it twice
    logging.getLogger("registry").setLevel(logging.CRITICAL)
    as_json = getattr(args, "json", False)
    if as_json:
        report = registry.DoctorReport()
    else:
        print(f"engine {registry.__version__} plugin doctor (python {sys.version.split()[0]})")
        report = registry.DoctorReport(on_section=lambda title: print(f"\n{title}"),
                                       on_line=_print_line)
    registry.doctor(report, extra_sections=[_platform_section])
    if as_json:
        print(json.dumps({"engine": registry.__version__, "problems": report.problems,
                          "sections": report.sections, "effects": report.effects}, indent=2))
    else:
        print(f"\n{report.problems} problem(s) found" if report.problems
              else "\nno problems found")
    return 1 if report.problems else 0


# ---------------------------------------------------------------------------
# schema


def run_schema(args: argparse.Namespace) -> int:
    """Print the manifest JSON Schema (also in docs/manifest.schema.json)."""
    import registry

    print(json.dumps(registry.manifest_json_schema(), indent=2))
    return 0


# ---------------------------------------------------------------------------
# test


def run_test(args: argparse.Namespace) -> int:
    """Run the conformance kit on one plugin (engine.testing; imports torch)."""
    from engine.testing._cli import run_test_command

    return run_test_command(args)
