"""``GET /metrics``: the engine's Prometheus stat logger, plus live server gauges."""

from __future__ import annotations

from typing import Any


def render_metrics(engine: Any) -> tuple[bytes, str]:
    """Prometheus text exposition of the stat loggers' registry (when the engine
    runs with stats on) followed by the server's own gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from engine.entrypoints.data_parallel import DataParallelEngine, render_data_parallel_metrics

    if isinstance(engine, DataParallelEngine):  # one labelled set of series per replica
        return render_data_parallel_metrics(engine)
    parts = []
    llm_engine = getattr(engine.llm, "llm_engine", None)
    stat_loggers = getattr(llm_engine, "stat_loggers", None)
    registry = getattr(stat_loggers, "prometheus_registry", None)
    if registry is not None:
        parts.append(generate_latest(registry))
    server_registry = CollectorRegistry()
    server_registry.register(_ServerCollector(engine))
    parts.append(generate_latest(server_registry))
    return b"".join(parts), CONTENT_TYPE_LATEST


class _ServerCollector:
    """Values read at scrape time, so they are current even between engine steps."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self.engine
        yield GaugeMetricFamily("engine_server_ready", "1 once the engine serves requests",
                                value=1.0 if engine.ready else 0.0)
        yield GaugeMetricFamily("engine_server_kv_cache_usage_perc",
                                "Fraction of KV-cache blocks held by requests, now",
                                value=engine.kv_cache_usage)
        yield GaugeMetricFamily("engine_server_requests_unfinished",
                                "Requests in the engine (waiting or running), now",
                                value=engine.num_unfinished_requests)
        yield CounterMetricFamily("engine_server_requests_aborted",
                                  "Requests aborted before they finished (client gone, shutdown)",
                                  value=engine.num_aborted)
