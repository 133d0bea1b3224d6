"""What the engine shows about its plugins (`engine plugins list`, ``GET
/v1/plugins``): the registry's rows, with the engine's note on route plugins.

Imports neither torch nor FastAPI: `engine plugins list` stays fast.
"""

from __future__ import annotations

from typing import Any

import registry

# api_route plugins are off by default even when enabled: `engine serve` mounts
# only those the operator names (engine/entrypoints/route_plugins.py)
ROUTE_PLUGIN_NOTE = "mounted only when enabled by name (--enable-route-plugin / ENGINE_PLUGINS)"
ROUTE_PLUGIN_NAMED_NOTE = "mounted by engine serve (named in ENGINE_PLUGINS)"


def plugin_note(record: registry.PluginRecord) -> str:
    """The NOTE of `engine plugins list` (``note`` in its JSON) for `record`: why
    it is disabled; for an enabled ``api_route`` plugin, that it is mounted only
    when named (or that ``ENGINE_PLUGINS`` names it); then its description."""
    if record.disabled_reason or not (record.enabled
                                      and record.group == registry.API_ROUTE_PLUGINS):
        return registry.plugin_note(record)
    route = (ROUTE_PLUGIN_NAMED_NOTE if registry.named_in_plugins_env(record.group, record.name)
             else ROUTE_PLUGIN_NOTE)
    return f"{route}; {record.description}" if record.description else route


def plugin_rows(group: str | None = None, *, with_effects: bool = False) -> list[dict[str, Any]]:
    """`registry.plugin_rows` with the engine's `plugin_note`."""
    return registry.plugin_rows(group, with_effects=with_effects, note=plugin_note)
