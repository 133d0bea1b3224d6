"""Loading plugins: import their values (and call the general ones) with every
failure isolated, logged with its origin, and recorded in the load trace."""

from __future__ import annotations

import logging
import os
import sys
import threading
from time import perf_counter
from typing import Any

from registry._discovery import discover
from registry._env import strict_mode
from registry._errors import PluginLoadError
from registry._groups import GENERAL_PLUGINS, api_problem, resolve_group
from registry._records import PluginRecord, record_event
from registry._qualname import resolve_qualname  # noqa: F401  (public via registry)
from registry._running import call_as, note_loaded, process_ending_name

logger = logging.getLogger("registry")

_general_done_pid: int | None = None
_general_lock = threading.RLock()


def _reset_lock_in_child() -> None:
    global _general_lock
    _general_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def _slow_import_seconds() -> float:
    try:
        return float(os.environ.get("ENGINE_PLUGIN_SLOW_IMPORT_SECONDS", "") or 5.0)
    except ValueError:
        return 5.0


def _warn_still_loading(record: PluginRecord, seconds: float) -> None:
    logger.warning("still importing %s (value %r) after %.0f s; a plugin that blocks at "
                   "import delays the engine's start", record.describe(), record.value, seconds)


def import_plugin(record: PluginRecord) -> Any:
    """Import the object `record` names, putting its folder on ``sys.path`` first,
    with the plugin marked as running. When the import takes longer than
    ``ENGINE_PLUGIN_SLOW_IMPORT_SECONDS`` (default 5) a WARNING names the plugin.

    Raises whatever the import raises (a ``SystemExit`` becomes PluginExit), and
    PluginLoadError when the value is a builtin that would end the process.
    """
    if record.path and record.path not in sys.path:
        sys.path.insert(0, record.path)
    seconds = _slow_import_seconds()
    watchdog = threading.Timer(seconds, _warn_still_loading, (record, seconds))
    watchdog.daemon = True
    watchdog.start()
    try:
        value = call_as(record, record.entry_point().load)
    finally:
        watchdog.cancel()
    ending = process_ending_name(value)
    if ending is not None:
        raise PluginLoadError(
            f"{record.describe()}: its value {record.value!r} is {ending}, which would end "
            "the engine's process; refusing to load it", record)
    declared = getattr(value, "engine_api", None)
    if record.api is None and declared is not None:
        api = api_problem(record.group, declared, record.describe())
        if api is not None:
            if api[0]:
                raise PluginLoadError(api[1], record)
            if strict_mode():
                raise PluginLoadError(api[1], record)
            logger.warning("%s", api[1])
    return value


def _fail(message: str, record: PluginRecord, exc: BaseException) -> None:
    if strict_mode():
        raise PluginLoadError(message, record) from exc
    logger.error(message, exc_info=exc)


def load_group(group: str) -> list[tuple[PluginRecord, Any]]:
    """Import every enabled plugin of `group`; ``[(record, object)]`` in load order."""
    loaded = []
    for record in discover(group):
        if not record.enabled:
            continue
        start = perf_counter()
        try:
            value = import_plugin(record)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            record_event(record, "import-failed", perf_counter() - start, error)
            _fail(f"cannot import {record.describe()} (value {record.value!r}): {error}", record, exc)
            continue
        seconds = perf_counter() - start
        note_loaded(record)
        record_event(record, "loaded", seconds)
        logger.debug("loaded %s in %.1f ms", record.describe(), seconds * 1000)
        loaded.append((record, value))
    return loaded


def load_plugins_by_group(group: str) -> dict[str, object]:
    """Import each enabled plugin of `group` (alias or full name) and return
    ``{name: object}`` without calling anything.

    A plugin that fails to import is logged at ERROR with its traceback and origin
    and left out; the rest still load. In strict mode it raises PluginLoadError.
    Raises ValueError for an unknown group.
    """
    return {record.name: value for record, value in load_group(resolve_group(group))}


def load_general_plugins() -> None:
    """Call every enabled general plugin, once per process id (a forked child runs
    them again).

    A plugin that raises is logged at ERROR with its traceback and origin, and the
    others still run; in strict mode it raises PluginLoadError.
    """
    global _general_done_pid
    with _general_lock:
        if _general_done_pid == os.getpid():
            return
        # set before calling, so a plugin that calls back in does not recurse
        _general_done_pid = os.getpid()
        try:
            _call_general_plugins()
        except BaseException:
            _general_done_pid = None
            raise


def _call_general_plugins() -> None:
    for record, func in load_group(GENERAL_PLUGINS):
        start = perf_counter()
        try:
            if not callable(func):
                raise TypeError(f"a general plugin's value must be callable, not {func!r}")
            call_as(record, func)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            record_event(record, "call-failed", perf_counter() - start, error)
            _fail(f"general {record.describe()} raised {error}", record, exc)
            continue
        record_event(record, "called", perf_counter() - start)
