"""registry: finds, validates, filters and loads the engine's plugins.

Plugins come from built-in manifests, installed entry points, the user's config
dir and plugin dirs (docs/reference.md, "Sources and precedence"); every source yields the same PluginRecord,
loaded through ``importlib.metadata.EntryPoint``. This package never imports
torch or ``engine``, and importing it is cheap: discovery, loading and the
manifest models (pydantic) are imported on first use.

Public API::

    discover(group=None) -> list[PluginRecord]
    load_plugins_by_group(group) -> dict[str, object]
    load_general_plugins() -> None
    add_plugin_dirs(dirs), strict_mode(), resolve_group(name), resolve_qualname(qualname)
    load_manifest(path), validate_manifest(path) -> list[str], manifest_json_schema()
    load_trace() -> list[LoadEvent]
    call_plugin(group, name, func, *args) -> result   # plugin code, isolated and attributed
    current_plugin() -> RunningPlugin | None, running(record)
    record_effect(kind, target), effects() -> list[dict]
    get_plugin_config(name), check_plugin_configs(), add_plugin_config(values)
    plugin_rows(group=None, with_effects=False) -> list[dict]   # list --json, /v1/plugins
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from registry._env import add_plugin_dirs, named_in_plugins_env, plugin_dirs, strict_mode
from registry._errors import ManifestError, PluginLoadError, RegistryError
from registry._groups import (
    API_ROUTE_PLUGINS,
    API_VERSIONS,
    GENERAL_PLUGINS,
    GRAPH_BACKEND_PLUGINS,
    GROUP_ALIASES,
    GROUPS,
    IO_PROCESSOR_PLUGINS,
    LOGITS_PROCESSOR_PLUGINS,
    PLATFORM_PLUGINS,
    QUANTIZATION_PLUGINS,
    SPEC_PROPOSER_PLUGINS,
    STAT_LOGGER_PLUGINS,
    resolve_group,
)
from registry._records import LoadEvent, PluginRecord, load_trace
from registry._version import __version__

# public name -> private module defining it, imported on first use (see __getattr__)
_LAZY = {
    "discover": "registry._discovery",
    "load_plugins_by_group": "registry._loading",
    "load_general_plugins": "registry._loading",
    "resolve_qualname": "registry._qualname",
    "Manifest": "registry._manifest",
    "load_manifest": "registry._manifest",
    "validate_manifest": "registry._manifest",
    "manifest_json_schema": "registry._manifest",
    "call_plugin": "registry._running",
    "current_plugin": "registry._running",
    "running": "registry._running",
    "RunningPlugin": "registry._running",
    "PluginExit": "registry._running",
    "record_effect": "registry._running",
    "effects": "registry._running",
    "get_plugin_config": "registry._settings",
    "check_plugin_configs": "registry._settings",
    "add_plugin_config": "registry._settings",
    "PluginConfigError": "registry._settings",
    "plugin_rows": "registry._listing",
}

__all__ = [
    "__version__",
    "GENERAL_PLUGINS",
    "PLATFORM_PLUGINS",
    "IO_PROCESSOR_PLUGINS",
    "STAT_LOGGER_PLUGINS",
    "LOGITS_PROCESSOR_PLUGINS",
    "API_ROUTE_PLUGINS",
    "GRAPH_BACKEND_PLUGINS",
    "SPEC_PROPOSER_PLUGINS",
    "QUANTIZATION_PLUGINS",
    "GROUPS",
    "GROUP_ALIASES",
    "API_VERSIONS",
    "resolve_group",
    "PluginRecord",
    "LoadEvent",
    "Manifest",
    "discover",
    "load_plugins_by_group",
    "load_general_plugins",
    "add_plugin_dirs",
    "plugin_dirs",
    "named_in_plugins_env",
    "strict_mode",
    "RegistryError",
    "ManifestError",
    "PluginLoadError",
    "load_manifest",
    "validate_manifest",
    "manifest_json_schema",
    "load_trace",
    "resolve_qualname",
    "call_plugin",
    "current_plugin",
    "running",
    "RunningPlugin",
    "PluginExit",
    "record_effect",
    "effects",
    "get_plugin_config",
    "check_plugin_configs",
    "add_plugin_config",
    "PluginConfigError",
    "plugin_rows",
]

if TYPE_CHECKING:  # pragma: no cover
    from registry._discovery import discover
    from registry._listing import plugin_rows
    from registry._loading import load_general_plugins, load_plugins_by_group
    from registry._qualname import resolve_qualname
    from registry._running import (
        PluginExit,
        RunningPlugin,
        call_plugin,
        current_plugin,
        effects,
        record_effect,
        running,
    )
    from registry._settings import (
        PluginConfigError,
        add_plugin_config,
        check_plugin_configs,
        get_plugin_config,
    )
    from registry._manifest import (
        Manifest,
        load_manifest,
        manifest_json_schema,
        validate_manifest,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
