"""A stat-logger plugin that appends one JSON object per line to a file.

The file is named by the ``ENGINE_STATS_JSONL`` environment variable (unset: the
logger does nothing and says so once). Lines, one per call::

    {"event": "engine_initialized", "engine_index": 0, "model": ..., "pid": ..., "time": ...}
    {"event": "record", "engine_index": 0, "time": ..., "scheduler": {...}, "iteration": {...}}

``scheduler`` and ``iteration`` are the fields of `engine.metrics.SchedulerStats`
and `engine.metrics.IterationStats` (finished requests included).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from engine.metrics import StatLoggerBase

__all__ = ["JsonlStatLogger", "ENV_VAR"]

ENV_VAR = "ENGINE_STATS_JSONL"
logger = logging.getLogger(__name__)


class JsonlStatLogger(StatLoggerBase):
    """Writes the engine's per-step statistics as JSON lines."""

    def __init__(self, config: Any, engine_index: int = 0) -> None:
        super().__init__(config, engine_index)
        path = os.environ.get(ENV_VAR)
        if not path:
            logger.warning("jsonl stat logger: %s is not set; writing nothing", ENV_VAR)
        # line-buffered append: lines of several engines interleave whole
        self._file = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def _write(self, event: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def log_engine_initialized(self) -> None:
        model_config = getattr(self.config, "model_config", None)
        self._write({
            "event": "engine_initialized",
            "engine_index": self.engine_index,
            "model": getattr(model_config, "model", None),
            "pid": os.getpid(),
            "time": time.time(),
        })

    def record(self, scheduler_stats, iteration_stats, engine_idx: int = 0) -> None:
        self._write({
            "event": "record",
            "engine_index": self.engine_index,
            "time": time.time(),
            "scheduler": _as_dict(scheduler_stats),
            "iteration": _as_dict(iteration_stats),
        })

    def log(self) -> None:
        if self._file is not None:
            self._file.flush()


def _as_dict(stats: Any) -> dict[str, Any] | None:
    return None if stats is None else dataclasses.asdict(stats)
