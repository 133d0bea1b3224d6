"""Entry point of the `engine` command.

Each subcommand is a module of this package exposing
``add_parser(subparsers, parents) -> None`` (which sets ``func`` on its parser)
and a ``run(args) -> int`` that it points ``func`` at. Modules are imported to
build the parser, so they must not import torch at module level: heavy imports
belong inside ``run``.

Global options (``--plugin-dir``, ``--platform``, ``--strict-plugins``,
``--plugin-config``, ``-v``)
are accepted before or after the subcommand. They are applied by exporting the
environment variables listed in docs/reference.md, so every process the engine starts
(workers included) sees the same settings.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

import registry
from engine.cli.common import log_formatter
from engine.utils import STARTUP_LOGGER

SUBCOMMAND_MODULES = ("plugins", "generate", "chat", "embed", "serve", "kernels")


def _global_options(top_level: bool) -> argparse.ArgumentParser:
    """Global options; below the subcommand they default to SUPPRESS so they never
    overwrite what was given above it."""
    suppress: dict[str, Any] = {} if top_level else {"default": argparse.SUPPRESS}
    suffix = "" if top_level else "_sub"
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument(
        "--plugin-dir",
        dest="plugin_dirs" + suffix,
        action="append",
        metavar="DIR",
        help="also load plugins from DIR (repeatable); reaches every engine process",
        **({"default": []} if top_level else suppress),
    )
    g.add_argument(
        "--platform",
        dest="platform" + suffix,
        metavar="NAME",
        help="use this platform plugin (same as ENGINE_PLATFORM)",
        **({"default": None} if top_level else suppress),
    )
    g.add_argument(
        "--strict-plugins",
        dest="strict_plugins" + suffix,
        action="store_true",
        help="turn every plugin error or warning into a failure (ENGINE_STRICT_PLUGINS=1)",
        **({"default": False} if top_level else suppress),
    )
    g.add_argument(
        "--plugin-config",
        dest="plugin_settings" + suffix,
        action="append",
        metavar="NAME.KEY=VALUE",
        help="a plugin setting (repeatable; VALUE is JSON when it parses, else a string); "
        "reaches every engine process",
        **({"default": []} if top_level else suppress),
    )
    g.add_argument(
        "-v",
        "--verbose",
        dest="verbose" + suffix,
        action="count",
        help="more log output (-v: INFO, -vv: DEBUG)",
        **({"default": 0} if top_level else suppress),
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="An LLM inference engine whose every extension point is a plugin.",
        parents=[_global_options(top_level=True)],
    )
    parser.add_argument("--version", action="version", version=f"engine {registry.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub_parents = [_global_options(top_level=False)]
    for name in SUBCOMMAND_MODULES:
        module_name = f"engine.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # subcommand not built yet
                continue
            raise
        module.add_parser(subparsers, sub_parents)
    return parser


def _merge_global_options(args: argparse.Namespace) -> None:
    args.plugin_dirs = list(args.plugin_dirs) + list(getattr(args, "plugin_dirs_sub", []))
    args.plugin_settings = list(args.plugin_settings) + list(getattr(args, "plugin_settings_sub", []))
    for name in ("platform", "strict_plugins", "verbose"):
        sub = getattr(args, name + "_sub", None)
        if sub:
            setattr(args, name, sub if name != "verbose" else args.verbose + sub)


def apply_global_options(args: argparse.Namespace) -> None:
    """Export the global options as environment variables (inherited by workers)
    and configure logging to stderr."""
    if args.plugin_dirs:
        dirs = [os.path.abspath(d) for d in args.plugin_dirs]
        existing = os.environ.get("ENGINE_PLUGIN_DIRS", "")
        os.environ["ENGINE_PLUGIN_DIRS"] = os.pathsep.join(dirs + ([existing] if existing else []))
    if args.platform:
        os.environ["ENGINE_PLATFORM"] = args.platform
    if args.strict_plugins:
        os.environ["ENGINE_STRICT_PLUGINS"] = "1"
    if args.plugin_settings:
        for setting in args.plugin_settings:
            registry.add_plugin_config(registry.parse_plugin_setting(setting))
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # the start-up decisions (KV-cache size, a kernel build) show without -v, as
    # plain lines
    startup = logging.getLogger(STARTUP_LOGGER)
    if not startup.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(log_formatter("engine: %(message)s"))
        startup.addHandler(handler)
    startup.setLevel(min(level, logging.INFO))
    startup.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the `engine` command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _merge_global_options(args)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        apply_global_options(args)
    except ValueError as exc:  # a malformed --plugin-config
        parser.error(str(exc))
    try:
        return int(args.func(args) or 0)
    except registry.RegistryError as exc:
        # strict plugin mode and refused plugins: the message names the plugin and
        # its origin; a traceback would only bury it (-vv shows it)
        if args.verbose >= 2:
            logging.getLogger("engine").exception("plugin error")
        print(f"engine: plugin error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
