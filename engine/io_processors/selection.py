"""Choosing the IO processor of an engine by plugin name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.io_processors.interface import IOProcessor

CONFIG_KEY = "io_processor_plugin"


def io_processor_plugin_name(config: EngineConfig, plugin_name: str | None = None) -> tuple[str, str] | None:
    """The plugin name an engine should use and where it came from, or None.

    Order: `plugin_name` (the caller's explicit choice), then
    ``config.model_config.io_processor_plugin`` (``LLM(io_processor_plugin=...)`` /
    ``--io-processor-plugin``), then the ``io_processor_plugin`` key of the model's
    config.json (``config.model_config.hf_config``).
    """
    if plugin_name:
        return plugin_name, "the io_processor_plugin argument"
    model_config = getattr(config, "model_config", None)
    explicit = getattr(model_config, "io_processor_plugin", None)
    if explicit:
        return explicit, "io_processor_plugin= / --io-processor-plugin"
    hf_config = getattr(model_config, "hf_config", None) or {}
    value = hf_config.get(CONFIG_KEY) if isinstance(hf_config, dict) else getattr(
        hf_config, CONFIG_KEY, None
    )
    if value is None:
        return None
    where = f"the {CONFIG_KEY!r} key of {_config_json(model_config)}"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a plugin name (a non-empty string), got {value!r}")
    return value, where


def get_io_processor(config: EngineConfig, plugin_name: str | None = None) -> IOProcessor | None:
    """Build the IO processor an engine with `config` should use, or None when no
    plugin is named (see `io_processor_plugin_name` for the order).

    The named ``io_processor`` plugin's value is called; it returns an `IOProcessor`
    subclass's qualified name, which is imported and built as ``Cls(config)``.

    Raises `ValueError` when the plugin is not available (listing the available
    ones) or its function returns None, `TypeError` when what it names is not an
    `IOProcessor` subclass, and `RuntimeError` when its function raises.
    """
    chosen = io_processor_plugin_name(config, plugin_name)
    if chosen is None:
        return None
    name, where = chosen
    import registry

    plugins = registry.load_plugins_by_group(registry.IO_PROCESSOR_PLUGINS)
    if name not in plugins:
        raise ValueError(_missing_message(registry, name, where, sorted(plugins)))
    origin = _origin(registry, name)
    label = f"io_processor plugin {name!r} (from {origin})"
    func = plugins[name]
    if not callable(func):
        raise TypeError(f"{label} must be a callable returning a qualified class name, got {func!r}")
    try:
        qualname = registry.call_plugin(registry.IO_PROCESSOR_PLUGINS, name, func)
    except Exception as exc:
        raise RuntimeError(f"{label} raised: {exc}") from exc
    if qualname is None:
        raise ValueError(f"{label} is not available here (its function returned None)")
    if not isinstance(qualname, str):
        raise TypeError(f"{label} must return a qualified class name string, got {qualname!r}")
    cls = registry.resolve_qualname(qualname)
    if not (isinstance(cls, type) and issubclass(cls, IOProcessor)):
        raise TypeError(
            f"{label} names {qualname!r}, which is not a subclass of "
            f"engine.io_processors.IOProcessor"
        )
    processor = cls(config)
    processor.plugin_name = name
    registry.record_effect("io_processor", qualname, plugin=name, group=registry.IO_PROCESSOR_PLUGINS)
    return processor


def _missing_message(registry: Any, name: str, where: str, available: list[str]) -> str:
    message = f"IO processor plugin {name!r} (named by {where}) is not available"
    for record in registry.discover(registry.IO_PROCESSOR_PLUGINS):
        if record.name == name:
            why = "is disabled" if not record.enabled else "failed to load (see the error above)"
            message += f"; it is discovered from {record.origin} but {why}"
            break
    listing = ", ".join(repr(n) for n in available) if available else "none"
    return f"{message}. Available io_processor plugins: {listing}"


def _origin(registry: Any, name: str) -> str:
    for record in registry.discover(registry.IO_PROCESSOR_PLUGINS):
        if record.name == name and record.enabled:
            return str(record.origin)
    return "unknown origin"


def _config_json(model_config: Any) -> str:
    model = getattr(model_config, "model", None)
    return str(Path(model) / "config.json") if model else "the model's config.json"

