"""Builds the stat loggers of an engine and fans the engine's calls out to them.

Built-ins first (`LoggingStatLogger`, `PrometheusStatLogger`), then loggers passed
by the caller, then every enabled plugin of the ``stat_logger`` group, each built
once per engine index. A plugin logger that raises is logged at ERROR once and the
others keep working; in strict mode (``ENGINE_STRICT_PLUGINS=1``) it raises.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from engine.config import EngineConfig
from engine.metrics.loggers import LoggingStatLogger, PrometheusStatLogger, StatLoggerBase
from engine.metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger("engine.metrics")

DEFAULT_LOG_INTERVAL = 5.0  # seconds between `log()` calls

# A class, or any callable (config, engine_index) -> StatLoggerBase
StatLoggerFactory = Callable[[Any, int], StatLoggerBase]


class _Entry:
    """One logger instance plus what to call it in an error message."""

    __slots__ = ("logger", "label", "isolated", "failed")

    def __init__(self, stat_logger: StatLoggerBase, label: str, isolated: bool) -> None:
        self.logger = stat_logger
        self.label = label
        self.isolated = isolated  # plugin or caller-supplied: its errors must not stop us
        self.failed = False


class StatLoggerManager:
    """Owns an engine's stat loggers and calls them.

    ``record`` goes to the loggers of the given engine index and, when
    `log_interval` seconds have passed since the last report, is followed by
    ``log()`` on every logger; ``shutdown()`` makes a final ``log()``.
    """

    def __init__(
        self,
        loggers: dict[int, list[_Entry]],
        log_interval: float = DEFAULT_LOG_INTERVAL,
        prometheus_registry: Any = None,
    ) -> None:
        self._loggers = loggers
        self._all = [entry for entries in loggers.values() for entry in entries]
        self.log_interval = log_interval
        self.prometheus_registry = prometheus_registry  # None when no Prometheus logger
        self._last_log = time.monotonic()

    @property
    def stat_loggers(self) -> list[StatLoggerBase]:
        """Every logger instance, all engine indices, in call order."""
        return [entry.logger for entry in self._all]

    def log_engine_initialized(self) -> None:
        """Tell every logger the engine is ready."""
        for entry in self._all:
            self._call(entry, "log_engine_initialized")

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        engine_idx: int = 0,
    ) -> None:
        """Pass one step's statistics to the loggers of engine `engine_idx`, then
        report if the logging interval has passed."""
        for entry in self._loggers.get(engine_idx, ()):
            self._call(entry, "record", scheduler_stats, iteration_stats, engine_idx)
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            self._log(now)

    def log(self) -> None:
        """Call ``log()`` on every logger now."""
        self._log(time.monotonic())

    def shutdown(self) -> None:
        """Final report at engine shutdown."""
        self.log()

    def _log(self, now: float) -> None:
        self._last_log = now
        for entry in self._all:
            self._call(entry, "log")

    def _call(self, entry: _Entry, method: str, *args: Any) -> None:
        if not entry.isolated:
            getattr(entry.logger, method)(*args)
            return
        try:
            getattr(entry.logger, method)(*args)
        except Exception:
            if _strict():
                raise
            if not entry.failed:
                entry.failed = True
                logger.exception(
                    "%s raised in %s(); it keeps being called but further errors are "
                    "not logged", entry.label, method,
                )


def build_stat_loggers(
    config: EngineConfig,
    engine_indices: Iterable[int] = (0,),
    custom: Sequence[StatLoggerFactory] | None = None,
    log_interval: float | None = None,
) -> StatLoggerManager:
    """Build the stat loggers of an engine with statistics on.

    `config` is the `EngineConfig`; one instance of every logger is built per index
    in `engine_indices`. `custom` adds the caller's own factories (classes or
    callables ``(config, engine_index) -> StatLoggerBase``) beside the built-ins and
    the ``stat_logger`` plugins. `log_interval` (seconds between ``log()`` calls)
    defaults to ``ENGINE_LOG_STATS_INTERVAL`` or 5.

    Raises `TypeError` naming the plugin and its origin when a ``stat_logger``
    plugin's value is not a `StatLoggerBase` subclass, or when a custom factory
    returns something else.
    """
    factories: list[tuple[str, StatLoggerFactory, bool]] = [
        ("built-in LoggingStatLogger", LoggingStatLogger, False),
        ("built-in PrometheusStatLogger", PrometheusStatLogger, False),
    ]
    factories += [(f"custom stat logger {f!r}", f, True) for f in custom or ()]
    factories += _plugin_factories()

    prometheus_registry = None
    if any(isinstance(f, type) and issubclass(f, PrometheusStatLogger) for _, f, _ in factories):
        from prometheus_client import CollectorRegistry

        prometheus_registry = CollectorRegistry()

    loggers: dict[int, list[_Entry]] = {}
    for index in engine_indices:
        entries = loggers.setdefault(index, [])
        for label, factory, isolated in factories:
            stat_logger = _construct(label, factory, isolated, config, index, prometheus_registry)
            if stat_logger is not None:
                entries.append(_Entry(stat_logger, label, isolated))
    if log_interval is None:
        log_interval = _interval_from_env()
    return StatLoggerManager(loggers, log_interval, prometheus_registry)


def _plugin_factories() -> list[tuple[str, StatLoggerFactory, bool]]:
    """Every enabled ``stat_logger`` plugin, sorted by name, checked to be a subclass."""
    import registry

    plugins = registry.load_plugins_by_group(registry.STAT_LOGGER_PLUGINS)
    if not plugins:
        return []
    origins = {
        record.name: record.origin
        for record in registry.discover(registry.STAT_LOGGER_PLUGINS)
        if record.enabled
    }
    factories: list[tuple[str, StatLoggerFactory, bool]] = []
    for name in sorted(plugins):
        value = plugins[name]
        origin = origins.get(name, "unknown origin")
        if not (isinstance(value, type) and issubclass(value, StatLoggerBase)):
            raise TypeError(
                f"stat_logger plugin {name!r} (from {origin}) must be a subclass of "
                f"engine.metrics.StatLoggerBase, got {value!r}"
            )
        factories.append((f"stat_logger plugin {name!r} (from {origin})", value, True))
        registry.record_effect("stat_logger", f"{value.__module__}.{value.__qualname__}",
                               plugin=name, group=registry.STAT_LOGGER_PLUGINS)
    return factories


def _construct(
    label: str,
    factory: StatLoggerFactory,
    isolated: bool,
    config: EngineConfig,
    index: int,
    prometheus_registry: Any,
) -> StatLoggerBase | None:
    kwargs = {}
    if isinstance(factory, type) and issubclass(factory, PrometheusStatLogger):
        kwargs["registry"] = prometheus_registry
    try:
        stat_logger = factory(config, index, **kwargs)
    except Exception:
        if not isolated or _strict():
            raise
        logger.exception("%s failed to initialize; it is left out", label)
        return None
    if not isinstance(stat_logger, StatLoggerBase):
        raise TypeError(f"{label} returned {stat_logger!r}, not a StatLoggerBase instance")
    return stat_logger


def _strict() -> bool:
    import registry

    return registry.strict_mode()


def _interval_from_env() -> float:
    raw = os.environ.get("ENGINE_LOG_STATS_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_LOG_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"ENGINE_LOG_STATS_INTERVAL must be a number of seconds, got {raw!r}"
        ) from None
    if value <= 0:
        raise ValueError(f"ENGINE_LOG_STATS_INTERVAL must be > 0, got {raw!r}")
    return value
