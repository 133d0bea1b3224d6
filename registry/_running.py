"""Which plugin's code is running, calling plugin code safely, and who did what.

The registry sets the running plugin around everything it runs on a plugin's
behalf (importing its value, calling a general plugin, asking a platform
detector...), so that code the plugin calls back into (``register_model``, an
attention-backend registration, a deprecated function) can ask
`current_plugin()` who is calling. `record_effect` keeps one entry per
registration, naming the plugin that made it and the one it replaced.

Cheap to import: the engine calls `current_plugin()` and `record_effect()` on its
registration paths without loading the discovery machinery.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from registry._env import strict_mode
from registry._errors import PluginLoadError
from registry._records import PluginRecord

logger = logging.getLogger("registry")

T = TypeVar("T")

USER = "user"  # the `plugin` of a registration made outside any plugin


@dataclass(frozen=True)
class RunningPlugin:
    """The plugin whose code is running: its name, full group, source and origin."""

    name: str
    group: str
    source: str = ""
    origin: str = ""

    def describe(self) -> str:
        where = f" from {self.source} {self.origin}" if self.source else ""
        return f"plugin {self.name!r} ({self.group}){where}"


_RUNNING: contextvars.ContextVar[RunningPlugin | None] = contextvars.ContextVar(
    "registry_running_plugin", default=None
)


def current_plugin() -> RunningPlugin | None:
    """The plugin whose code is running in this thread/task, or None for user code."""
    return _RUNNING.get()


@contextlib.contextmanager
def running(plugin: PluginRecord | RunningPlugin) -> Iterator[None]:
    """Mark `plugin` (a PluginRecord or RunningPlugin) as running for the block."""
    if not isinstance(plugin, RunningPlugin):
        plugin = RunningPlugin(plugin.name, plugin.group, plugin.source, plugin.origin)
    token = _RUNNING.set(plugin)
    try:
        yield
    finally:
        _RUNNING.reset(token)


class PluginExit(RuntimeError):
    """A plugin tried to end the process (``sys.exit``, ``SystemExit``, ...) while
    the engine was running its code; the engine turned that into this error."""


def call_as(plugin: PluginRecord | RunningPlugin, func: Callable[..., T], *args: Any,
            **kwargs: Any) -> T:
    """Call `func` (plugin code) with `plugin` (a PluginRecord or RunningPlugin)
    marked as running.

    A ``SystemExit`` or other ``BaseException`` that is not an ``Exception``
    (``KeyboardInterrupt`` excepted: that is the user's) becomes a `PluginExit`
    naming the plugin and its origin, so that callers which isolate plugin failures
    with ``except Exception`` also survive a plugin that tries to end the process.
    """
    with running(plugin):
        try:
            return func(*args, **kwargs)
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as exc:
            raise PluginExit(
                f"{plugin.describe()} tried to end the process ({type(exc).__name__}: "
                f"{exc}); the engine keeps running without it"
            ) from exc


def call_plugin(group: str, name: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `func(*args, **kwargs)`, code of plugin `name` of `group` (alias or full
    name), as the engine must call every plugin function it got from the registry:
    with the plugin marked as running (see `current_plugin`) and a ``SystemExit``
    turned into `PluginExit` (a RuntimeError naming the plugin and its origin)."""
    from registry._groups import resolve_group

    full = resolve_group(group)
    plugin = RunningPlugin(name, full)
    discovery = sys.modules.get("registry._discovery")
    if discovery is not None:
        for record in discovery.current_discovery().records:
            if record.enabled and record.group == full and record.name == name:
                plugin = RunningPlugin(name, full, record.source, record.origin)
                break
    return call_as(plugin, func, *args, **kwargs)


# ---------------------------------------------------------------------------
# process-ending values


def _process_ending() -> dict[int, str]:
    import builtins
    import signal

    named: dict[str, Any] = {
        "os.abort": os.abort, "os._exit": os._exit, "sys.exit": sys.exit,
        "builtins.exit": getattr(builtins, "exit", None),
        "builtins.quit": getattr(builtins, "quit", None),
        "os.kill": getattr(os, "kill", None), "os.killpg": getattr(os, "killpg", None),
        "signal.raise_signal": getattr(signal, "raise_signal", None),
        "signal.pthread_kill": getattr(signal, "pthread_kill", None),
    }
    for name in ("execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe"):
        named[f"os.{name}"] = getattr(os, name, None)
    return {id(obj): name for name, obj in named.items() if obj is not None}


_ENDING: dict[int, str] | None = None


def process_ending_name(value: object) -> str | None:
    """``"os.abort"`` etc. when `value` is a builtin known to end or replace the
    process (a plugin value must never be one), else None."""
    global _ENDING
    if _ENDING is None:
        _ENDING = _process_ending()
    return _ENDING.get(id(value))


# ---------------------------------------------------------------------------
# effects: who registered what


@dataclass(frozen=True)
class Effect:
    """One registration: `plugin` (name, or ``"user"``) of `group` made `kind`
    (``model``, ``attention_backend``, ``custom_op``, ``logits_processor``,
    ``model_loader``, ``route``, ``platform``, ``stat_logger``, ``io_processor``)
    point at `target`, replacing `replaced`'s registration (None: nothing replaced)."""

    plugin: str
    group: str | None
    kind: str
    target: str
    replaced: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "group": self.group, "kind": self.kind,
                "target": self.target, "replaced": self.replaced}


_EFFECTS: list[Effect] = []
_OWNERS: dict[tuple[str, str], str] = {}  # (kind, target) -> plugin name or "user"
_WARNED: set[tuple[str, str, str, str]] = set()
_EFFECTS_LOCK = threading.Lock()


def _reset_in_child() -> None:
    global _EFFECTS_LOCK
    _EFFECTS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


_PACKAGES: dict[str, RunningPlugin] = {}  # top-level package -> the plugin loaded from it


def note_loaded(record: PluginRecord) -> None:
    """Remember which top-level package a (non-builtin) plugin's value lives in, so
    that code of that package registering something later, outside any plugin call
    (a platform's worker hook, say), is still attributed to the plugin."""
    if record.source == "builtin":
        return
    top = record.value.partition(":")[0].partition(".")[0]
    _PACKAGES.setdefault(top, RunningPlugin(record.name, record.group, record.source,
                                            record.origin))


def plugin_of_module(module: str | None) -> RunningPlugin | None:
    """The plugin loaded from `module`'s top-level package, if any."""
    if not module:
        return None
    return _PACKAGES.get(module.partition(".")[0])


def record_effect(kind: str, target: str, *,
                  plugin: str | PluginRecord | RunningPlugin | None = None,
                  group: str | None = None, module: str | None = None) -> Effect:
    """Record that the running plugin (or `plugin`: a name, with its `group`, or a
    PluginRecord or RunningPlugin; default: `current_plugin()`, else the plugin
    loaded from `module`'s package, else user code) registered `target` as a `kind`.

    When it replaces another plugin's registration of the same (kind, target), one
    WARNING per process names both (strict mode: PluginLoadError); re-registration
    by the same plugin, or by user code over user code, is logged at INFO.
    """
    if plugin is None:
        plugin = current_plugin() or plugin_of_module(module)
    if plugin is None:
        name, group = USER, None
    elif isinstance(plugin, str):
        name = plugin
        if group is not None:
            from registry._groups import resolve_group

            group = resolve_group(group)
    else:
        name, group = plugin.name, plugin.group
    key = (kind, target)
    with _EFFECTS_LOCK:
        previous = _OWNERS.get(key)
        _OWNERS[key] = name
        effect = Effect(name, group, kind, target, previous)
        _EFFECTS.append(effect)
        warn_key = (kind, target, previous or "", name)
        first_time = warn_key not in _WARNED
        _WARNED.add(warn_key)
    if previous is not None:
        if previous != name:
            message = (f"{kind} {target!r}: {_who(name)} replaces the registration "
                       f"made by {_who(previous)}")
            if strict_mode():
                raise PluginLoadError(message)
            if first_time:
                logger.warning(message)
        else:
            logger.info("%s %r registered again by %s", kind, target, _who(name))
    return effect


def _who(name: str) -> str:
    return "user code" if name == USER else f"plugin {name!r}"


def effects() -> list[dict[str, Any]]:
    """Every registration recorded in this process, oldest first, as dicts with
    ``plugin``, ``group``, ``kind``, ``target`` and ``replaced``."""
    with _EFFECTS_LOCK:
        return [effect.to_json() for effect in _EFFECTS]
