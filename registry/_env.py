"""The environment variables that steer the registry (docs/reference.md: sources, filtering).
Cheap to import: `engine` reads these without loading the discovery machinery."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from registry._groups import resolve_group

_TRUE = ("1", "true", "yes", "on")


def strict_mode() -> bool:
    """True when ``ENGINE_STRICT_PLUGINS`` is set to 1/true/yes/on (``--strict-plugins``):
    every plugin error or warning then raises PluginLoadError."""
    return os.environ.get("ENGINE_STRICT_PLUGINS", "").strip().lower() in _TRUE


def plugin_dirs() -> list[str]:
    """The plugin dirs of ``ENGINE_PLUGIN_DIRS``, absolute, first occurrence first."""
    raw = os.environ.get("ENGINE_PLUGIN_DIRS", "")
    dirs = [os.path.abspath(d) for d in raw.split(os.pathsep) if d.strip()]
    return list(dict.fromkeys(dirs))


def config_dir() -> str:
    """``ENGINE_CONFIG_DIR``, else the platformdirs user config dir of app ``engine``."""
    configured = os.environ.get("ENGINE_CONFIG_DIR")
    if configured:
        return os.path.abspath(configured)
    import platformdirs

    return platformdirs.user_config_dir("engine", appauthor=False)


def autoload() -> bool:
    """False when ``ENGINE_PLUGINS_AUTOLOAD`` is 0/false/no/off: entry-point and
    config-dir plugins then load only when a positive ``ENGINE_PLUGINS`` entry
    names them."""
    return os.environ.get("ENGINE_PLUGINS_AUTOLOAD", "").strip().lower() not in _FALSE


_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class PluginFilter:
    """``ENGINE_PLUGINS`` parsed: entries ``name``, ``group:name``, ``-name`` and
    ``-group:name`` (group: alias or full name; ``None`` below means any group).

    With at least one positive entry, or when the variable is set but empty, it
    is an allow-list; with only negative entries everything not denied loads. A
    deny always wins. `problems` lists entries naming an unknown group.
    """

    is_set: bool
    allow: frozenset[tuple[str | None, str]]
    deny: frozenset[tuple[str | None, str]]
    problems: tuple[str, ...] = ()

    @property
    def is_allow_list(self) -> bool:
        return self.is_set and (bool(self.allow) or not self.deny)

    def allows(self, group: str, name: str) -> bool:
        """Whether a positive entry names this plugin."""
        return (None, name) in self.allow or (group, name) in self.allow

    def denies(self, group: str, name: str) -> bool:
        """Whether a negative entry names this plugin."""
        return (None, name) in self.deny or (group, name) in self.deny


def plugin_filter() -> PluginFilter:
    """Parse ``ENGINE_PLUGINS`` (whitespace around entries ignored)."""
    raw = os.environ.get("ENGINE_PLUGINS")
    if raw is None:
        return PluginFilter(False, frozenset(), frozenset())
    allow: set[tuple[str | None, str]] = set()
    deny: set[tuple[str | None, str]] = set()
    problems = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        negative = entry.startswith("-")
        spec = entry[1:].strip() if negative else entry
        group: str | None = None
        if ":" in spec:
            group_text, _, spec = spec.partition(":")
            try:
                group = resolve_group(group_text.strip())
            except ValueError as exc:
                problems.append(f"ENGINE_PLUGINS entry {entry!r}: {exc}")
                continue
            spec = spec.strip()
        if spec:
            (deny if negative else allow).add((group, spec))
    return PluginFilter(True, frozenset(allow), frozenset(deny), tuple(problems))


def named_in_plugins_env(group: str, name: str) -> bool:
    """Whether a positive ``ENGINE_PLUGINS`` entry (``name`` or ``group:name``) names
    plugin `name` of `group` (alias or full name) and no negative entry denies it:
    the opt-in that off-by-default plugins (``api_route``) need."""
    parsed = plugin_filter()
    full = resolve_group(group)
    return parsed.allows(full, name) and not parsed.denies(full, name)


def denied_in_plugins_env(group: str, name: str) -> bool:
    """Whether a negative ``ENGINE_PLUGINS`` entry (``-name`` or ``-group:name``)
    denies plugin `name` of `group` (alias or full name): a deny always wins, even
    over an explicit opt-in such as ``engine serve --enable-route-plugin``."""
    return plugin_filter().denies(resolve_group(group), name)


def add_plugin_dirs(dirs: list[str] | tuple[str, ...]) -> None:
    """Prepend `dirs` to ``ENGINE_PLUGIN_DIRS`` (so every process the engine starts
    sees them) and drop the discovery cache."""
    new = [os.path.abspath(os.fspath(d)) for d in dirs]
    merged = list(dict.fromkeys(new + plugin_dirs()))
    os.environ["ENGINE_PLUGIN_DIRS"] = os.pathsep.join(merged)
    clear_discovery_cache()


def clear_discovery_cache() -> None:
    """Forget the cached discovery: the next `discover` scans again (needed only
    after a change discovery cannot see, such as a new file in a plugin dir; a
    change of its environment variables or of the plugin state is seen anyway)."""
    # without a discovery module loaded there is nothing to forget: importing it
    # here would cost what `import registry` avoids
    discovery = sys.modules.get("registry._discovery")
    if discovery is not None:
        discovery.clear_cache()
