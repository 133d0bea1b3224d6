"""The JSON rows of `engine plugins list --json` and ``GET /v1/plugins`` (one
implementation for both)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("registry")

# api_route plugins are off by default even when enabled: `engine serve` mounts
# only those the operator names (engine/entrypoints/route_plugins.py)
ROUTE_PLUGIN_NOTE = "mounted only when enabled by name (--enable-route-plugin / ENGINE_PLUGINS)"
ROUTE_PLUGIN_NAMED_NOTE = "mounted by engine serve (named in ENGINE_PLUGINS)"


def plugin_note(record: Any) -> str:
    """The NOTE of `engine plugins list` (``note`` in its JSON) for `record`, a
    `PluginRecord`: why it is disabled; for an enabled ``api_route`` plugin, that
    it is mounted only when named (or that ``ENGINE_PLUGINS`` names it); then its
    description."""
    from registry._env import named_in_plugins_env
    from registry._groups import API_ROUTE_PLUGINS

    if record.disabled_reason:
        return record.disabled_reason
    if not (record.enabled and record.group == API_ROUTE_PLUGINS):
        return record.description
    route = (ROUTE_PLUGIN_NAMED_NOTE if named_in_plugins_env(record.group, record.name)
             else ROUTE_PLUGIN_NOTE)
    return f"{route}; {record.description}" if record.description else route


def plugin_rows(group: str | None = None, *, with_effects: bool = False) -> list[dict[str, Any]]:
    """One dict per discovered plugin (of `group`, alias or full name; None: all):
    the PluginRecord keys, ``note`` (the table's NOTE: see `plugin_note`), ``config`` (its settings with secrets masked, or None)
    and, with `with_effects`, ``effects``: the registrations it made in this
    process (see `registry.effects`)."""
    from registry._discovery import current_discovery
    from registry._groups import resolve_group
    from registry._settings import PluginConfigError, describe_config, raw_plugin_config

    full = resolve_group(group) if group is not None else None
    records = [r for r in current_discovery().records if full is None or r.group == full]
    try:
        given = raw_plugin_config()
    except PluginConfigError as exc:
        logger.error("%s", exc)
        given = {}
    made: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    if with_effects:
        from registry._running import effects

        for effect in effects():
            made.setdefault((effect["plugin"], effect["group"]), []).append(effect)
    rows = []
    for record in records:
        row = record.to_json()
        row["note"] = plugin_note(record)
        row["config"] = (describe_config(record, given)
                         if record.config_model or record.name in given else None)
        if with_effects:
            row["effects"] = made.get((record.name, record.group), []) if record.enabled else []
        rows.append(row)
    return rows
