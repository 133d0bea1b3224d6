"""The plugin groups (docs/reference.md, "Plugin groups") and their short aliases."""

from __future__ import annotations

GENERAL_PLUGINS = "engine.general_plugins"
PLATFORM_PLUGINS = "engine.platform_plugins"
IO_PROCESSOR_PLUGINS = "engine.io_processor_plugins"
STAT_LOGGER_PLUGINS = "engine.stat_logger_plugins"
LOGITS_PROCESSOR_PLUGINS = "engine.logits_processor_plugins"
API_ROUTE_PLUGINS = "engine.api_route_plugins"
GRAPH_BACKEND_PLUGINS = "engine.graph_backend_plugins"
SPEC_PROPOSER_PLUGINS = "engine.spec_proposer_plugins"
LORA_RESOLVER_PLUGINS = "engine.lora_resolver_plugins"
QUANTIZATION_PLUGINS = "engine.quantization_plugins"

# alias -> full entry-point group name, in the order the groups are listed everywhere
GROUP_ALIASES: dict[str, str] = {
    "general": GENERAL_PLUGINS,
    "platform": PLATFORM_PLUGINS,
    "io_processor": IO_PROCESSOR_PLUGINS,
    "stat_logger": STAT_LOGGER_PLUGINS,
    "logits_processor": LOGITS_PROCESSOR_PLUGINS,
    "api_route": API_ROUTE_PLUGINS,
    "graph_backend": GRAPH_BACKEND_PLUGINS,
    "spec_proposer": SPEC_PROPOSER_PLUGINS,
    "lora_resolver": LORA_RESOLVER_PLUGINS,
    "quantization": QUANTIZATION_PLUGINS,
}
GROUPS: tuple[str, ...] = tuple(GROUP_ALIASES.values())

# The interface version of each group (what a plugin of that group is called with
# and must return); a plugin states the one it was written for with `api = N` in
# its manifest or `engine_api = N` on its loaded object. A version is bumped on an
# incompatible change; the previous one stays supported (loaded with a
# deprecation WARNING) for at least one minor release (docs/compatibility.md).
API_VERSIONS: dict[str, int] = {alias: 1 for alias in GROUP_ALIASES}
OLDEST_API_VERSIONS: dict[str, int] = {alias: 1 for alias in GROUP_ALIASES}
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


def api_problem(group: str, declared: object, who: str) -> tuple[bool, str] | None:
    """Check a plugin's declared interface version against its group's.

    Returns None when it is the current one (or none was declared), ``(True,
    message)`` when the plugin must be refused (newer than this engine, older than
    the oldest it supports, or not an integer), ``(False, message)`` for an older
    supported version (load it, with a deprecation WARNING). `who` names the plugin.
    """
    if declared is None:
        return None
    alias = group_alias(group)
    current, oldest = API_VERSIONS[alias], OLDEST_API_VERSIONS[alias]
    if isinstance(declared, bool) or not isinstance(declared, int):
        return True, f"{who} states api version {declared!r}; expected an integer"
    if declared == current:
        return None
    span = f"{oldest}" if oldest == current else f"{oldest} to {current}"
    if declared > current:
        return True, (f"{who} is written for {alias} interface version {declared}, newer than "
                      f"this engine's {current} (it supports {span}); upgrade the engine or "
                      "use an older release of the plugin")
    if declared < oldest:
        return True, (f"{who} is written for {alias} interface version {declared}, older than "
                      f"this engine supports ({span}); upgrade the plugin")
    return False, (f"{who} is written for {alias} interface version {declared}; this engine's "
                   f"is {current} and version {declared} is deprecated: upgrade the plugin "
                   "before support for it is removed")
