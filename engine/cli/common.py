"""What the commands that build an engine (`generate`, `chat`, `serve`) share: the
model as a positional argument, and the start-up line naming out-of-tree plugins.

Imported to build the parser: no torch here.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

import registry

# the api_route group is off unless `engine serve --enable-route-plugin` names a
# plugin, so an installed route plugin is not "active" at start-up
_NOT_ACTIVE_BY_DEFAULT = ("engine.api_route_plugins",)


# what a terminal acts on instead of showing: C0 controls but newline and tab (ESC
# starts escape sequences, CR overwrites the line, BEL rings), DEL, and the C1
# controls (U+009B is CSI, U+009D OSC on terminals that take them in UTF-8)
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` from a model, a plugin or a manifest as a terminal should show it:
    each control character a terminal would act on written as its ``\\xNN``
    escape. Such text is not trusted with the terminal: an ``ESC ]`` in it starts
    an operating-system command that swallows every later character (and can set
    the window title or the clipboard). Newlines and tabs are kept; so is all
    printable Unicode."""
    return _TERMINAL_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def for_stdout(text: str) -> str:
    """`text` made `terminal_safe` when standard output is a terminal, unchanged
    when it is a pipe or a file (those get the model's exact text)."""
    return terminal_safe(text) if sys.stdout.isatty() else text


def json_for_stdout(value: object) -> str:
    """`value` as JSON text (non-ASCII kept as is) for standard output. On a
    terminal the characters JSON may carry raw but a terminal acts on (DEL and the
    C1 controls: JSON escapes only those below U+0020) are written as ``\\u00NN``,
    which decodes to the same value."""
    text = json.dumps(value, ensure_ascii=False)
    if not sys.stdout.isatty():
        return text
    return re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text)


class TerminalSafeFormatter(logging.Formatter):
    """The log formatter for a terminal: each formatted record made `terminal_safe`
    (log lines quote plugin errors, manifest paths and request text)."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


def log_formatter(fmt: str) -> logging.Formatter:
    """A formatter for records written to stderr: `TerminalSafeFormatter` when
    stderr is a terminal, the plain one when it is a pipe or a file."""
    return TerminalSafeFormatter(fmt) if sys.stderr.isatty() else logging.Formatter(fmt)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``engine CMD MODEL``: the model as an optional positional argument, as
    ``vllm serve MODEL`` and ``ollama run MODEL`` take it (``--model`` stays)."""
    parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                        help="model folder, GGUF file or cached 'org/name' (same as --model)")


def resolve_model_argument(args: argparse.Namespace, command: str) -> None:
    """Fold the positional MODEL into ``args.model``. Raises ValueError when both
    are given and differ."""
    positional = getattr(args, "model_positional", None)
    if positional is None:
        return
    if args.model is not None and args.model != positional:
        raise ValueError(f"the model is given twice, as MODEL ({positional!r}) and as "
                         f"--model ({args.model!r}); give it once (engine {command} MODEL)")
    args.model = positional


def announce_loading(command: str, model: str | None) -> None:
    """On a terminal, one line saying the model is loading (importing torch and
    loading weights take seconds); nothing when stderr is piped, where only the
    start-up decisions are logged."""
    if sys.stderr.isatty():
        print(f"engine {command}: loading {model or 'the embedded default model'} ...",
              file=sys.stderr, flush=True)


def announce_out_of_tree_plugins(command: str) -> None:
    """One line on stderr naming the enabled plugins that are not built in (installed
    packages, config-dir manifests, plugin dirs), so a plugin installed for one
    experiment never acts silently on later commands. Nothing when there are none."""
    active = [r for r in registry.discover()
              if r.enabled and r.source != "builtin" and r.group not in _NOT_ACTIVE_BY_DEFAULT]
    if not active:
        return
    names = "; ".join(_describe(r) for r in active)
    print(f"engine {command}: out-of-tree plugins active: {names} "
          "(ENGINE_PLUGINS=\"\" turns them off; engine plugins list shows all)",
          file=sys.stderr, flush=True)


def _describe(record: registry.PluginRecord) -> str:
    alias = next((a for a, g in registry.GROUP_ALIASES.items() if g == record.group),
                 record.group)
    return f"{record.name} ({alias}, {record.source} {record.origin})"
