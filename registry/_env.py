"""The environment variables that steer the registry (docs/reference.md: sources, filtering).
Cheap to import: `engine` reads these without loading the discovery machinery."""

from __future__ import annotations

import os
import sys

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


def allow_list() -> set[str] | None:
    """The names of ``ENGINE_PLUGINS``, or None when it is unset (everything allowed)."""
    raw = os.environ.get("ENGINE_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def add_plugin_dirs(dirs: list[str] | tuple[str, ...]) -> None:
    """Prepend `dirs` to ``ENGINE_PLUGIN_DIRS`` (so every process the engine starts
    sees them) and drop the discovery cache."""
    new = [os.path.abspath(os.fspath(d)) for d in dirs]
    merged = list(dict.fromkeys(new + plugin_dirs()))
    os.environ["ENGINE_PLUGIN_DIRS"] = os.pathsep.join(merged)
    discovery = sys.modules.get("registry._discovery")
    if discovery is not None:
        discovery.clear_cache()
