"""Disabling and enabling a plugin for every later engine process (`engine plugins
disable/enable`): the decision, on top of the persisted state of `registry._state`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from registry._discovery import current_discovery
from registry._errors import RegistryError
from registry._groups import resolve_group
from registry._records import PluginRecord
from registry._state import read_disabled, state_path, write_disabled


class BuiltinPluginError(RegistryError, ValueError):
    """`disable_plugin` was asked to disable a plugin that only the engine itself
    provides: builtins always load."""


@dataclass(frozen=True)
class StateChange:
    """What `disable_plugin` / `enable_plugin` did.

    ``group`` is the full group name (None: every group); ``path`` the state file
    written; ``changed`` False when the plugin already was in the asked state;
    ``matches`` the discovered plugins of that name (and group) now;
    ``disabled_everywhere`` (enable with a group only) True when a group-less
    disable of the name still holds.
    """

    name: str
    group: str | None
    path: str
    changed: bool
    matches: tuple[PluginRecord, ...]
    disabled_everywhere: bool = False


class PluginStateError(RegistryError, ValueError):
    """The plugin-state file cannot be read or replaced (not JSON, a folder, a link
    to something else); the message is one line naming the file and the fix."""


def _state_error(exc: Exception) -> PluginStateError:
    path = state_path()
    kind = (f"a symbolic link to {os.readlink(path)!r}; " if os.path.islink(path) else
            "a folder, not a file; " if os.path.isdir(path) else "")
    message = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
    return PluginStateError(f"{message} ({kind}fix or remove the file: it only lists the "
                            "plugins disabled with `engine plugins disable`)")


def _read_disabled() -> set[tuple[str | None, str]]:
    try:
        return set(read_disabled())
    except (OSError, ValueError) as exc:
        raise _state_error(exc) from exc


def _write_disabled(disabled: set[tuple[str | None, str]]) -> str:
    try:
        return write_disabled(disabled)
    except (OSError, ValueError) as exc:
        raise _state_error(exc) from exc


def _matches(name: str, group: str | None) -> tuple[PluginRecord, ...]:
    return tuple(r for r in current_discovery().records
                 if r.name == name and (group is None or r.group == group))


def disable_plugin(name: str, group: str | None = None) -> StateChange:
    """Persist in the config dir that plugin `name` (of `group`, alias or full name;
    None: of every group) must not load in any later engine process.

    Raises ValueError for an unknown group, PluginStateError (a ValueError) for a
    state file that cannot be read or written, and
    BuiltinPluginError when every discovered plugin of that name is a builtin.
    """
    full = resolve_group(group) if group else None
    matches = _matches(name, full)
    if matches and all(r.source == "builtin" for r in matches):
        raise BuiltinPluginError(f"plugin {name!r} is built in, and builtin plugins cannot be disabled")
    disabled = _read_disabled()
    changed = (full, name) not in disabled
    disabled.add((full, name))
    return StateChange(name, full, _write_disabled(disabled), changed, matches)


def enable_plugin(name: str, group: str | None = None) -> StateChange:
    """Undo `disable_plugin`: plugin `name` (of `group`, alias or full name; None:
    of every group) loads again. Raises ValueError for an unknown group and
    PluginStateError (a ValueError) for a state file that cannot be read or written."""
    full = resolve_group(group) if group else None
    matches = _matches(name, full)
    disabled = _read_disabled()
    kept = {(g, n) for g, n in disabled if not (n == name and (full is None or g == full))}
    path = _write_disabled(kept)
    everywhere = full is not None and (None, name) in kept
    return StateChange(name, full, path, len(kept) != len(disabled), matches, everywhere)
