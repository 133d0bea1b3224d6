"""The plugin groups (docs/reference.md, "Plugin groups") and their short aliases."""

from __future__ import annotations

GENERAL_PLUGINS = "engine.general_plugins"
PLATFORM_PLUGINS = "engine.platform_plugins"
IO_PROCESSOR_PLUGINS = "engine.io_processor_plugins"
STAT_LOGGER_PLUGINS = "engine.stat_logger_plugins"
LOGITS_PROCESSOR_PLUGINS = "engine.logits_processor_plugins"
API_ROUTE_PLUGINS = "engine.api_route_plugins"

# alias -> full entry-point group name, in the order the groups are listed everywhere
GROUP_ALIASES: dict[str, str] = {
    "general": GENERAL_PLUGINS,
    "platform": PLATFORM_PLUGINS,
    "io_processor": IO_PROCESSOR_PLUGINS,
    "stat_logger": STAT_LOGGER_PLUGINS,
    "logits_processor": LOGITS_PROCESSOR_PLUGINS,
    "api_route": API_ROUTE_PLUGINS,
}
GROUPS: tuple[str, ...] = tuple(GROUP_ALIASES.values())
_ALIAS_OF = {full: alias for alias, full in GROUP_ALIASES.items()}
# every accepted spelling -> full name
FULL_GROUP_NAME: dict[str, str] = {**GROUP_ALIASES, **{full: full for full in GROUPS}}


def valid_group_names() -> str:
    """The accepted group spellings, for error messages."""
    return ", ".join(f"{alias} ({full})" for alias, full in GROUP_ALIASES.items())


def resolve_group(name_or_alias: str) -> str:
    """Return the full entry-point group name for an alias (``"platform"``) or a
    full name (``"engine.platform_plugins"``).

    Raises ValueError listing the valid groups when the name is neither.
    """
    if name_or_alias in _ALIAS_OF:
        return name_or_alias
    full = GROUP_ALIASES.get(name_or_alias)
    if full is None:
        raise ValueError(
            f"unknown plugin group {name_or_alias!r}; valid groups are: {valid_group_names()}"
        )
    return full


def group_alias(group: str) -> str:
    """The short alias of a full group name (``engine.platform_plugins`` -> ``platform``)."""
    return _ALIAS_OF.get(group, group)
