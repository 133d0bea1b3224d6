"""``GET /metrics``: the engine's Prometheus stat logger, plus live server gauges;
with data parallelism, every replica's, labelled by replica index."""

from __future__ import annotations

from typing import Any

from engine.entrypoints.data_parallel import DataParallelEngine


def render_metrics(engine: Any) -> tuple[bytes, str]:
    """Prometheus text exposition of the stat loggers' registry (when the engine
    runs with stats on) followed by the server's own gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

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


# ---------------------------------------------------------------- data parallel


def render_data_parallel_metrics(engine: DataParallelEngine) -> tuple[bytes, str]:
    """Prometheus text of every replica (its stat loggers' series and the server
    gauges), each series labelled ``engine="i"``, plus per-replica routing counters."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_ReplicaCollector(engine))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _ReplicaCollector:
    """Merges the replicas' metric families, setting the ``engine`` label to the
    replica index (each replica's own engine index is 0)."""

    def __init__(self, engine: DataParallelEngine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        merged: dict[str, Metric] = {}
        for i, replica in enumerate(self.engine.replicas):
            sources = [_ServerCollector(replica)]
            llm_engine = getattr(replica.llm, "llm_engine", None)
            own = getattr(getattr(llm_engine, "stat_loggers", None), "prometheus_registry", None)
            if own is not None:
                sources.append(own)
            for source in sources:
                for family in source.collect():
                    target = merged.get(family.name)
                    if target is None:
                        target = merged[family.name] = Metric(
                            family.name, family.documentation, family.type, family.unit)
                    for sample in family.samples:
                        labels = dict(sample.labels, engine=str(i))
                        target.add_sample(sample.name, labels, sample.value,
                                          sample.timestamp, sample.exemplar)
        yield from merged.values()
        routed = CounterMetricFamily(
            "engine_server_data_parallel_requests_routed",
            "Requests (generation and embedding) the server sent to each replica",
            labels=["engine"])
        in_flight = GaugeMetricFamily(
            "engine_server_data_parallel_requests_in_flight",
            "Requests each replica runs now, as the router counts them", labels=["engine"])
        for i in range(len(self.engine.replicas)):
            routed.add_metric([str(i)], self.engine.routed[i])
            in_flight.add_metric([str(i)], self.engine.in_flight[i])
        yield routed
        yield in_flight
