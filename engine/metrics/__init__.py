"""Engine statistics and the stat loggers that receive them (docs/reference.md,
"Other extension interfaces").

`build_stat_loggers(config)` gives the engine a `StatLoggerManager` holding the
built-in loggers (`LoggingStatLogger`, `PrometheusStatLogger`) and every enabled
``stat_logger`` plugin; `RequestStatsTracker` turns the engine's per-step events
into `IterationStats`. Importing this package does not import torch or
prometheus_client.
"""

from engine.metrics.loggers import LoggingStatLogger, PrometheusStatLogger, StatLoggerBase
from engine.metrics.manager import StatLoggerManager, build_stat_loggers
from engine.metrics.stats import (
    FinishedRequestStats,
    IterationStats,
    PrefixCacheStats,
    RequestStatsTracker,
    SchedulerStats,
    SchedulerStatsBuilder,
)

__all__ = [
    "StatLoggerBase",
    "LoggingStatLogger",
    "PrometheusStatLogger",
    "StatLoggerManager",
    "build_stat_loggers",
    "SchedulerStats",
    "PrefixCacheStats",
    "IterationStats",
    "FinishedRequestStats",
    "RequestStatsTracker",
    "SchedulerStatsBuilder",
]
