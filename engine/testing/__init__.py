"""The conformance kit: checks a plugin against the engine's contracts and its
reference implementations.

Two ways to run it, with the same checks:

- ``engine plugins test NAME [--group G] [--json] [-k EXPR]`` (exit 0 when every
  check passes, 1 otherwise; one line per failed check naming it and what differed);
- ``pytest -p engine.testing --engine-plugin NAME`` (one test item per check; the
  usual ``-k``, ``-x``, ``-v`` apply).

A platform plugin is checked for its detector, its class, ``check_and_update_config``,
its attention backend against ``NAIVE``, the custom ops it replaces against their
``forward_native``, its device communicator against gloo over two ranks, and greedy
tokens of an engine run against the ``cpu`` platform's (also with a LoRA adapter,
where the platform's worker implements LoRA). General, IO-processor and
stat-logger plugins are checked against their own contracts. See
docs/writing-a-platform-plugin.md ("Conformance kit").

Importing this package imports neither torch nor pytest: checks import what they
need when they run.
"""

from __future__ import annotations

from typing import Any

from engine.testing._core import (
    Check,
    CheckFailed,
    CheckResult,
    CheckSkipped,
    KitContext,
    keyword_matcher,
    run_check,
)
from engine.testing._kit import collect_checks, plugin_groups, run_plugin_checks

__all__ = [
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "KitContext",
    "collect_checks",
    "keyword_matcher",
    "plugin_groups",
    "run_check",
    "run_plugin_checks",
]


# ---------------------------------------------------------------------------
# pytest plugin (`pytest -p engine.testing --engine-plugin NAME`)


def pytest_addoption(parser: Any) -> None:
    """Register ``--engine-plugin NAME`` and ``--engine-plugin-group G``."""
    group = parser.getgroup("engine", "engine plugin conformance kit")
    group.addoption("--engine-plugin", action="append", default=[], metavar="NAME",
                    help="run the engine's conformance checks of plugin NAME (repeatable) "
                         "instead of collecting test files")
    group.addoption("--engine-plugin-group", default=None, metavar="G",
                    help="only the plugin's checks in group G (alias or full name)")


def pytest_collection(session: Any) -> bool | None:
    """With ``--engine-plugin``, the session's items are the kit's checks."""
    names = session.config.getoption("engine_plugin")
    if not names:
        return None
    from engine.testing._pytest import collect_session

    collect_session(session, names, session.config.getoption("engine_plugin_group"))
    return True


def pytest_sessionfinish(session: Any) -> None:
    """Undo the kit's changes to this process (the current platform, the environment)."""
    if not session.config.getoption("engine_plugin"):
        return
    from engine.testing._pytest import CONTEXT_KEY

    ctx = session.config.stash.get(CONTEXT_KEY, None)
    if ctx is not None:
        ctx.close()
