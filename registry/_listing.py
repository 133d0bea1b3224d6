"""The JSON rows of `engine plugins list --json` and ``GET /v1/plugins`` (one
implementation for both)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from registry._discovery import current_discovery
from registry._groups import resolve_group
from registry._records import PluginRecord
from registry._running import effects
from registry._settings import PluginConfigError, describe_config, raw_plugin_config

logger = logging.getLogger("registry")


def plugin_note(record: PluginRecord) -> str:
    """What a listing says about `record` besides its fields: why it is disabled,
    else its description."""
    return record.disabled_reason or record.description


def plugin_rows(group: str | None = None, *, with_effects: bool = False,
                note: Callable[[PluginRecord], str] | None = None) -> list[dict[str, Any]]:
    """One dict per discovered plugin (of `group`, alias or full name; None: all):
    the PluginRecord keys, ``note`` (``note(record)``; None: `plugin_note`; an
    application adds what it knows, as the engine does for route plugins),
    ``config`` (its settings with secrets masked, or None) and, with
    `with_effects`, ``effects``: the registrations it made in this process (see
    `registry.effects`)."""
    note = plugin_note if note is None else note
    full = resolve_group(group) if group is not None else None
    records = [r for r in current_discovery().records if full is None or r.group == full]
    try:
        given = raw_plugin_config()
    except PluginConfigError as exc:
        logger.error("%s", exc)
        given = {}
    made: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    if with_effects:
        for effect in effects():
            made.setdefault((effect["plugin"], effect["group"]), []).append(effect)
    rows = []
    for record in records:
        row = record.to_json()
        row["note"] = note(record)
        row["config"] = (describe_config(record, given)
                         if record.config_model or record.name in given else None)
        if with_effects:
            row["effects"] = made.get((record.name, record.group), []) if record.enabled else []
        rows.append(row)
    return rows
