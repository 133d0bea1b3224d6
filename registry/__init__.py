"""registry: finds, validates, filters and loads the engine's plugins.

Plugins come from built-in manifests, installed entry points, the user's config
dir and plugin dirs (docs/reference.md, "Sources and precedence"); every source yields the same PluginRecord,
loaded through ``importlib.metadata.EntryPoint``. This package never imports
torch or ``engine``, and importing it is cheap: discovery, loading and the
manifest models (pydantic) are imported on first use.

Public API::

    discover(group=None) -> list[PluginRecord]
    current_discovery() -> Discovery     # records, problems, seconds; never raises
    clear_discovery_cache()
    load_plugins_by_group(group) -> dict[str, object]
    load_general_plugins() -> None
    import_plugin(record) -> object      # one record's value, isolated and attributed
    add_plugin_dirs(dirs), plugin_dirs(), config_dir(), strict_mode()
    named_in_plugins_env(group, name), denied_in_plugins_env(group, name)
    resolve_group(name), group_alias(group), resolve_qualname(qualname)
    disable_plugin(name, group=None), enable_plugin(name, group=None) -> StateChange
    load_manifest(path), validate_manifest(path) -> list[str], manifest_json_schema()
    check_manifest(path, import_values=False) -> list[str]
    check_manifests(paths, import_values=False) -> list[(file, problems)]
    load_trace() -> list[LoadEvent]
    call_plugin(group, name, func, *args), call_as(plugin, func, *args)  # plugin code
    current_plugin() -> RunningPlugin | None, running(record), plugin_of_module(module)
    record_effect(kind, target), effects() -> list[dict]
    get_plugin_config(name), check_plugin_configs(), add_plugin_config(values)
    parse_plugin_setting("NAME.KEY=VALUE") -> {NAME: {KEY: VALUE}}
    plugin_rows(group=None, with_effects=False, note=plugin_note) -> list[dict]
    doctor(DoctorReport(), extra_sections=()) -> DoctorReport
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from registry._env import (
    add_plugin_dirs,
    clear_discovery_cache,
    config_dir,
    denied_in_plugins_env,
    named_in_plugins_env,
    plugin_dirs,
    strict_mode,
)
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
    LORA_RESOLVER_PLUGINS,
    PLATFORM_PLUGINS,
    QUANTIZATION_PLUGINS,
    SPEC_PROPOSER_PLUGINS,
    STAT_LOGGER_PLUGINS,
    group_alias,
    resolve_group,
)
from registry._records import LoadEvent, PluginRecord, load_trace
from registry._version import __version__

# public name -> private module defining it, imported on first use (see __getattr__)
_LAZY = {
    "discover": "registry._discovery",
    "current_discovery": "registry._discovery",
    "Discovery": "registry._discovery",
    "DiscoveryProblem": "registry._sources",
    "load_plugins_by_group": "registry._loading",
    "load_general_plugins": "registry._loading",
    "import_plugin": "registry._loading",
    "resolve_qualname": "registry._qualname",
    "Manifest": "registry._manifest",
    "load_manifest": "registry._manifest",
    "validate_manifest": "registry._manifest",
    "manifest_json_schema": "registry._manifest",
    "call_plugin": "registry._running",
    "call_as": "registry._running",
    "plugin_of_module": "registry._running",
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
    "parse_plugin_setting": "registry._settings",
    "plugin_rows": "registry._listing",
    "plugin_note": "registry._listing",
    "disable_plugin": "registry._switch",
    "enable_plugin": "registry._switch",
    "StateChange": "registry._switch",
    "BuiltinPluginError": "registry._switch",
    "PluginStateError": "registry._switch",
    "check_manifest": "registry._checks",
    "check_manifests": "registry._checks",
    "DoctorReport": "registry._doctor",
    "doctor": "registry._doctor",
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
    "LORA_RESOLVER_PLUGINS",
    "QUANTIZATION_PLUGINS",
    "GROUPS",
    "GROUP_ALIASES",
    "API_VERSIONS",
    "resolve_group",
    "group_alias",
    "PluginRecord",
    "LoadEvent",
    "Manifest",
    "discover",
    "current_discovery",
    "clear_discovery_cache",
    "Discovery",
    "DiscoveryProblem",
    "load_plugins_by_group",
    "load_general_plugins",
    "import_plugin",
    "add_plugin_dirs",
    "plugin_dirs",
    "config_dir",
    "named_in_plugins_env",
    "denied_in_plugins_env",
    "strict_mode",
    "disable_plugin",
    "enable_plugin",
    "StateChange",
    "BuiltinPluginError",
    "PluginStateError",
    "RegistryError",
    "ManifestError",
    "PluginLoadError",
    "load_manifest",
    "validate_manifest",
    "check_manifest",
    "check_manifests",
    "manifest_json_schema",
    "load_trace",
    "resolve_qualname",
    "call_plugin",
    "call_as",
    "current_plugin",
    "plugin_of_module",
    "running",
    "RunningPlugin",
    "PluginExit",
    "record_effect",
    "effects",
    "get_plugin_config",
    "check_plugin_configs",
    "add_plugin_config",
    "PluginConfigError",
    "parse_plugin_setting",
    "plugin_rows",
    "plugin_note",
    "DoctorReport",
    "doctor",
]

if TYPE_CHECKING:  # pragma: no cover
    from registry._checks import check_manifest, check_manifests
    from registry._discovery import Discovery, current_discovery, discover
    from registry._doctor import DoctorReport, doctor
    from registry._listing import plugin_note, plugin_rows
    from registry._loading import import_plugin, load_general_plugins, load_plugins_by_group
    from registry._manifest import (
        Manifest,
        load_manifest,
        manifest_json_schema,
        validate_manifest,
    )
    from registry._qualname import resolve_qualname
    from registry._running import (
        PluginExit,
        RunningPlugin,
        call_as,
        call_plugin,
        current_plugin,
        effects,
        plugin_of_module,
        record_effect,
        running,
    )
    from registry._settings import (
        PluginConfigError,
        add_plugin_config,
        check_plugin_configs,
        get_plugin_config,
        parse_plugin_setting,
    )
    from registry._sources import DiscoveryProblem
    from registry._switch import (
        BuiltinPluginError,
        PluginStateError,
        StateChange,
        disable_plugin,
        enable_plugin,
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
