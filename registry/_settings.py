"""Typed plugin settings.

A plugin declares its settings as a pydantic model: ``config = "pkg.mod:Settings"``
in its ``[[plugin]]`` table, or the attribute ``engine_config_model`` on its loaded
object. Values come from, lowest precedence first:

1. ``[plugins.NAME]`` tables of ``engine.toml`` in the config dir;
2. ``ENGINE_PLUGIN_CONFIG``, a JSON object ``{"NAME": {...}}``;
3. ``--plugin-config NAME.KEY=VALUE`` (the CLI merges it into ``ENGINE_PLUGIN_CONFIG``);
4. ``LLM(plugin_config={"NAME": {...}})`` (merged into ``ENGINE_PLUGIN_CONFIG`` too).

Layers 3 and 4 travel in the environment, so every process the engine starts
(tensor-parallel workers included) sees the same values. pydantic is imported
only when a model is validated.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from registry._env import config_dir
from registry._errors import RegistryError
from registry._records import PluginRecord

ENV = "ENGINE_PLUGIN_CONFIG"
CONFIG_FILE = "engine.toml"
SECRET_MASK = "**********"


class PluginConfigError(RegistryError, ValueError):
    """Plugin settings that cannot be read or do not validate. Each line of the
    message reads ``plugin NAME config: FIELD: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively for nested tables."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _file_values() -> dict[str, dict[str, Any]]:
    path = os.path.join(config_dir(), CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    from registry._manifest import read_file
    from registry._toml import TomlSyntaxError, parse_toml

    try:
        document = parse_toml(read_file(path))
    except TomlSyntaxError as exc:
        raise PluginConfigError([f"{path}:{exc.line}:{exc.col}: {exc.message}"]) from None
    except RegistryError as exc:
        raise PluginConfigError([str(exc)]) from None
    plugins = document.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise PluginConfigError([f"{path}: plugins: expected [plugins.NAME] tables"])
    return plugins


def _env_values() -> dict[str, dict[str, Any]]:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return {}
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise PluginConfigError([f"{ENV}: not valid JSON: {exc}"]) from None
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise PluginConfigError([f'{ENV}: expected a JSON object {{"NAME": {{...}}}}'])
    return values


def raw_plugin_config() -> dict[str, dict[str, Any]]:
    """Every plugin's given values, layers merged (engine.toml, then the environment,
    which holds ENGINE_PLUGIN_CONFIG, --plugin-config and LLM(plugin_config=...))."""
    return _merge(_file_values(), _env_values())


def add_plugin_config(values: dict[str, dict[str, Any]]) -> None:
    """Merge `values` (``{"NAME": {KEY: VALUE}}``) over ``ENGINE_PLUGIN_CONFIG`` in
    this process's environment (inherited by every process it starts) and forget
    the validated settings. Raises PluginConfigError for a malformed mapping."""
    if not isinstance(values, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in values.items()
    ):
        raise PluginConfigError([f'plugin_config: expected {{"NAME": {{...}}}}, got {values!r}'])
    merged = _merge(_env_values(), values)
    try:
        os.environ[ENV] = json.dumps(merged)
    except TypeError as exc:
        raise PluginConfigError([f"plugin_config: values must be JSON-compatible: {exc}"]) from None
    clear_cache()


def parse_plugin_setting(text: str) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` -> ``{"NAME": {"KEY": VALUE}}``. The last dot before ``=``
    separates NAME (which may itself contain dots) from KEY; VALUE is parsed as JSON
    when it parses, else kept as a string. Raises ValueError for another shape."""
    target, sep, value_text = text.partition("=")
    name, dot, key = target.strip().rpartition(".")
    if not sep or not dot or not name or not key:
        raise ValueError(f"--plugin-config expects NAME.KEY=VALUE, got {text!r}")
    try:
        value = json.loads(value_text)
    except ValueError:
        value = value_text
    return {name: {key: value}}


# ---------------------------------------------------------------------------
# models


def model_of(record: PluginRecord) -> Any:
    """The settings model plugin `record` declares (manifest ``config``, imported
    from the plugin's folder; else the ``engine_config_model`` attribute of its
    loaded object), or None. Raises whatever importing it raises."""
    if record.config_model:
        import sys

        from registry._qualname import resolve_qualname
        from registry._running import call_as

        if record.path and record.path not in sys.path:
            sys.path.insert(0, record.path)
        return call_as(record, resolve_qualname, record.config_model)
    from registry._loading import import_plugin

    return getattr(import_plugin(record), "engine_config_model", None)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(settings)"


def validate_settings(name: str, model: Any, values: dict[str, Any]) -> Any:
    """`values` validated by `model`; raises PluginConfigError with one
    ``plugin NAME config: FIELD: message`` line per problem."""
    from pydantic import BaseModel, ValidationError

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise PluginConfigError([f"plugin {name} config: (settings): its settings model "
                                 f"{model!r} is not a pydantic BaseModel subclass"])
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise PluginConfigError([
            f"plugin {name} config: {_field(e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]) from None


def redacted(settings: Any) -> dict[str, Any]:
    """A validated settings instance as JSON-ready values, secrets (``SecretStr``,
    ``SecretBytes``) shown as ``"**********"``."""
    return settings.model_dump(mode="json")


def _record(name: str) -> PluginRecord | None:
    from registry._discovery import current_discovery

    candidates = [r for r in current_discovery().records if r.name == name]
    enabled = [r for r in candidates if r.enabled]
    with_model = [r for r in enabled if r.config_model]
    best = with_model or enabled or candidates
    return best[0] if best else None


_cache: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget validated settings (the next `get_plugin_config` validates again)."""
    with _cache_lock:
        _cache.clear()


def get_plugin_config(name: str) -> Any:
    """The validated settings of plugin `name`: an instance of the model it declares,
    built from the merged values (the model's defaults when nothing was given).
    Works in every engine process, workers included.

    Returns None when the plugin declares no model and was given no values. Raises
    KeyError when no plugin of that name is discovered, PluginConfigError for
    values that do not validate (``plugin NAME config: FIELD: message``).
    """
    values = raw_plugin_config().get(name, {})
    key = (name, json.dumps(values, sort_keys=True, default=str))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    record = _record(name)
    if record is None:
        raise KeyError(f"no plugin named {name!r} is discovered")
    model = model_of(record)
    if model is None:
        if values:
            raise PluginConfigError([f"plugin {name} config: (settings): values were given, "
                                     "but the plugin declares no settings model"])
        settings = None
    else:
        settings = validate_settings(name, model, values)
    with _cache_lock:
        _cache[key] = settings
    return settings


def check_plugin_configs() -> None:
    """Validate, at engine start, the settings of every enabled plugin that declares
    a model in its manifest or was given values; values for a name no plugin has
    are an error too (a typo must not pass silently). Also puts the merged values
    (engine.toml included) in ``ENGINE_PLUGIN_CONFIG`` for the processes the engine
    starts. Raises PluginConfigError listing every problem."""
    from registry._discovery import current_discovery

    given = raw_plugin_config()
    if given:
        # every layer in the environment: processes started from here (workers, Ray
        # actors on other machines without this engine.toml) see the same values
        os.environ[ENV] = json.dumps(given)
    records = current_discovery().records
    known = {r.name for r in records}
    problems = [f"plugin {name} config: (settings): no plugin named {name!r} is discovered"
                for name in sorted(set(given) - known)]
    names = sorted({r.name for r in records if r.enabled and (r.config_model or r.name in given)})
    for name in names:
        try:
            get_plugin_config(name)
        except PluginConfigError as exc:
            problems += exc.problems
        except Exception as exc:  # the model itself cannot be imported
            problems.append(f"plugin {name} config: (settings): cannot load its settings "
                            f"model: {type(exc).__name__}: {exc}")
    if problems:
        raise PluginConfigError(problems)


def describe_config(record: PluginRecord, given: dict[str, dict[str, Any]]) -> Any:
    """What `engine plugins list --json` shows under ``config`` without importing
    plugin code beyond a manifest-declared settings model: the validated values
    with secrets masked; ``{"error": ...}`` when they do not validate; the given
    values with every value masked when no model is declared (nothing says which
    are secret); None when the plugin has no settings at all."""
    values = given.get(record.name)
    if record.config_model:
        try:
            return redacted(validate_settings(record.name, model_of(record), values or {}))
        except PluginConfigError as exc:
            return {"error": str(exc)}
        except Exception as exc:
            return {"error": f"cannot load settings model {record.config_model!r}: "
                             f"{type(exc).__name__}: {exc}"}
    if values:
        return {key: SECRET_MASK for key in values}
    return None
