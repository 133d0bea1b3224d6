"""Stat loggers: the base class plugins subclass, and the two built-ins.

A stat logger is built once per engine index with ``Cls(config, engine_index)``;
the engine then calls ``log_engine_initialized()`` once, ``record(...)`` after
every step and ``log()`` on the logging interval and at shutdown (see
`engine.metrics.StatLoggerManager`, which does the calling).
"""

from __future__ import annotations

import logging
import time
import weakref
from abc import ABC, abstractmethod
from typing import Any

from engine.metrics.stats import IterationStats, SchedulerStats
from engine.spec_decode.stats import SpecDecodingCounts

logger = logging.getLogger("engine.metrics")


def _model_name(config: Any) -> str:
    """The name the model is served under: `served_model_name`, else the model path."""
    model_config = getattr(config, "model_config", None)
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", None)
    return str(name) if name else "unknown"


class StatLoggerBase(ABC):
    """Base class of every stat logger (docs/reference.md, "Other extension interfaces").

    Subclasses implement `record`; `log` and `log_engine_initialized` are optional.
    A stat-logger plugin's entry-point value is the subclass itself.
    """

    def __init__(self, config: Any, engine_index: int = 0) -> None:
        """`config` is the engine's `EngineConfig`; `engine_index` says which engine
        (data-parallel rank) this instance receives statistics for."""
        self.config = config
        self.engine_index = engine_index

    @abstractmethod
    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        engine_idx: int = 0,
    ) -> None:
        """Take the statistics of one engine step. Called on every step, so keep it cheap:
        accumulate here, report in `log`."""

    def log(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Report what was recorded since the last call (called every few seconds and
        once at shutdown)."""

    def log_engine_initialized(self) -> None:  # noqa: B027 - optional hook
        """Called once when the engine is ready (model loaded, KV cache sized)."""


class LoggingStatLogger(StatLoggerBase):
    """Writes one INFO line per `log()` call to the ``engine.metrics`` logger:
    prompt and generation throughput since the previous line, running and waiting
    requests, KV-cache usage and the prefix-cache hit rate since the previous line.
    Consecutive idle lines are written only once."""

    def __init__(self, config: Any, engine_index: int = 0) -> None:
        super().__init__(config, engine_index)
        self._last_log_time = time.monotonic()
        self._last_scheduler_stats = SchedulerStats()
        self._last_line_idle = False
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._num_preemptions = 0
        self._spec = SpecDecodingCounts()

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._last_scheduler_stats = scheduler_stats
            self._prefix_queries += scheduler_stats.prefix_cache_stats.queries
            self._prefix_hits += scheduler_stats.prefix_cache_stats.hits
            self._num_preemptions += scheduler_stats.num_preemptions
            spec = scheduler_stats.spec_decoding_stats
            if spec is not None and spec.num_drafts:
                self._spec.merge(spec)
        if iteration_stats is not None:
            self._num_prompt_tokens += iteration_stats.num_prompt_tokens
            self._num_generation_tokens += iteration_stats.num_generation_tokens

    def log(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_log_time, 1e-9)
        sched = self._last_scheduler_stats
        idle = (
            self._num_prompt_tokens == 0
            and self._num_generation_tokens == 0
            and sched.num_running_reqs == 0
            and sched.num_waiting_reqs == 0
        )
        if not (idle and self._last_line_idle):
            logger.info(self.format_line(elapsed))
        self._last_line_idle = idle
        self._last_log_time = now
        self._reset_interval()

    def format_line(self, elapsed: float) -> str:
        """The line `log()` writes for an interval of `elapsed` seconds."""
        sched = self._last_scheduler_stats
        hit_rate = self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0
        line = (
            f"Engine {self.engine_index:03d}: "
            f"Avg prompt throughput: {self._num_prompt_tokens / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {self._num_generation_tokens / elapsed:.1f} tokens/s, "
            f"Running: {sched.num_running_reqs} reqs, Waiting: {sched.num_waiting_reqs} reqs, "
            f"KV cache usage: {sched.kv_cache_usage * 100:.1f}%, "
            f"Prefix cache hit rate: {hit_rate * 100:.1f}%"
        )
        if self._num_preemptions:
            line += f", Preemptions: {self._num_preemptions}"
        spec = self._spec
        if spec.num_drafts:
            per_position = ", ".join(f"{n / spec.num_drafts:.2f}"
                                     for n in spec.accepted_per_position)
            line += (f", Spec decode: {spec.num_draft_tokens} drafted, "
                     f"{spec.num_accepted_tokens} accepted tokens, acceptance rate "
                     f"{spec.acceptance_rate * 100:.1f}%, mean acceptance length "
                     f"{1 + spec.num_accepted_tokens / spec.num_drafts:.2f}, "
                     f"per-position acceptance rate [{per_position}]")
        return line

    def log_engine_initialized(self) -> None:
        cache = getattr(self.config, "cache_config", None)
        logger.info(
            "Engine %03d: initialized for model %s (%s KV-cache blocks of %s tokens)",
            self.engine_index,
            _model_name(self.config),
            getattr(cache, "num_blocks", None),
            getattr(cache, "block_size", None),
        )


# ---------------------------------------------------------------------------
# Prometheus

_LABELS = ("model_name", "engine")
_FINISH_REASONS = ("stop", "length", "abort")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
                  20000, 50000, 100000)


class _PrometheusMetrics:
    """The metric families of one CollectorRegistry. Loggers that share a registry
    (one per engine index) share these and write to their own label children."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, [*_LABELS, *extra], registry=registry)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return Gauge(name, doc, [*_LABELS, *extra], registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, list(_LABELS), buckets=buckets, registry=registry)

        self.prompt_tokens = counter("engine_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("engine_generation_tokens", "Tokens generated.")
        self.request_success = counter(
            "engine_request_success", "Requests finished, by finish reason.", ("finished_reason",)
        )
        self.num_preemptions = counter("engine_num_preemptions", "Requests preempted.")
        self.prefix_cache_queries = counter(
            "engine_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "engine_prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.num_requests_running = gauge(
            "engine_num_requests_running", "Requests in the running batch."
        )
        self.num_requests_waiting = gauge(
            "engine_num_requests_waiting", "Requests waiting to be scheduled."
        )
        self.kv_cache_usage = gauge(
            "engine_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = 100 percent)."
        )
        # speculative decoding: vLLM's names (spec_decode_*)
        self.spec_decode_num_drafts = counter(
            "engine_spec_decode_num_drafts", "Sequences that carried draft tokens into a step.")
        self.spec_decode_num_draft_tokens = counter(
            "engine_spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_decode_num_accepted_tokens = counter(
            "engine_spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_decode_num_accepted_tokens_per_pos = counter(
            "engine_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in their sequence's run of drafts.",
            ("position",))
        self.cache_config_info = gauge(
            "engine_cache_config_info", "KV-cache configuration (value is always 1).",
            ("block_size", "num_blocks"),
        )
        self.time_to_first_token = histogram(
            "engine_time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "engine_inter_token_latency_seconds", "Time between consecutive tokens.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "engine_e2e_request_latency_seconds", "Request latency, arrival to finish.",
            _E2E_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "engine_request_prompt_tokens", "Prompt tokens per finished request.", _TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "engine_request_generation_tokens", "Generated tokens per finished request.",
            _TOKEN_BUCKETS,
        )


_metrics_by_registry: weakref.WeakKeyDictionary[Any, _PrometheusMetrics] = (
    weakref.WeakKeyDictionary()
)


def _metrics_for(registry: Any) -> _PrometheusMetrics:
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = _PrometheusMetrics(registry)
    return metrics


class PrometheusStatLogger(StatLoggerBase):
    """Keeps Prometheus counters, gauges and histograms labelled with `model_name`
    and `engine` (the engine index).

    Metrics live in `self.registry`, a private ``prometheus_client.CollectorRegistry``
    unless one is passed, so several engines in one process never collide; loggers
    of one engine's indices share a registry. Expose it with
    ``prometheus_client.generate_latest(logger.registry)``. Counters (``*_total``):
    ``engine_prompt_tokens``, ``engine_generation_tokens``,
    ``engine_request_success{finished_reason}``, ``engine_num_preemptions``,
    ``engine_prefix_cache_queries``, ``engine_prefix_cache_hits``; with speculative
    decoding ``engine_spec_decode_num_drafts``, ``engine_spec_decode_num_draft_tokens``,
    ``engine_spec_decode_num_accepted_tokens``,
    ``engine_spec_decode_num_accepted_tokens_per_pos{position}``. Gauges:
    ``engine_num_requests_running``, ``engine_num_requests_waiting``,
    ``engine_kv_cache_usage_perc`` (0..1), ``engine_cache_config_info``. Histograms:
    ``engine_time_to_first_token_seconds``, ``engine_inter_token_latency_seconds``,
    ``engine_e2e_request_latency_seconds``, ``engine_request_prompt_tokens``,
    ``engine_request_generation_tokens``.
    """

    def __init__(self, config: Any, engine_index: int = 0, registry: Any = None) -> None:
        super().__init__(config, engine_index)
        if registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
        self.registry = registry
        self.model_name = _model_name(config)
        self._metrics = _metrics_for(registry)
        self._labels = (self.model_name, str(engine_index))
        m, labels = self._metrics, self._labels
        # bind label children once: record() runs every step
        self._prompt_tokens = m.prompt_tokens.labels(*labels)
        self._generation_tokens = m.generation_tokens.labels(*labels)
        self._num_preemptions = m.num_preemptions.labels(*labels)
        self._prefix_queries = m.prefix_cache_queries.labels(*labels)
        self._prefix_hits = m.prefix_cache_hits.labels(*labels)
        self._running = m.num_requests_running.labels(*labels)
        self._waiting = m.num_requests_waiting.labels(*labels)
        self._kv_usage = m.kv_cache_usage.labels(*labels)
        self._ttft = m.time_to_first_token.labels(*labels)
        self._itl = m.inter_token_latency.labels(*labels)
        self._e2e = m.e2e_request_latency.labels(*labels)
        self._req_prompt_tokens = m.request_prompt_tokens.labels(*labels)
        self._req_generation_tokens = m.request_generation_tokens.labels(*labels)
        self._spec_drafts = m.spec_decode_num_drafts.labels(*labels)
        self._spec_draft_tokens = m.spec_decode_num_draft_tokens.labels(*labels)
        self._spec_accepted = m.spec_decode_num_accepted_tokens.labels(*labels)
        self._spec_per_pos: list[Any] = []  # children by position, bound on first use
        self._success: dict[str, Any] = {}
        for reason in _FINISH_REASONS:  # present as 0 before the first request finishes
            self._success_counter(reason)

    def _success_counter(self, reason: str) -> Any:
        child = self._success.get(reason)
        if child is None:
            child = self._success[reason] = self._metrics.request_success.labels(
                *self._labels, reason
            )
        return child

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._running.set(scheduler_stats.num_running_reqs)
            self._waiting.set(scheduler_stats.num_waiting_reqs)
            self._kv_usage.set(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix.queries:
                self._prefix_queries.inc(prefix.queries)
                self._prefix_hits.inc(prefix.hits)
            if scheduler_stats.num_preemptions:
                self._num_preemptions.inc(scheduler_stats.num_preemptions)
            spec = scheduler_stats.spec_decoding_stats
            if spec is not None and spec.num_drafts:
                self._record_spec(spec)
        if iteration_stats is None:
            return
        if iteration_stats.num_prompt_tokens:
            self._prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        if iteration_stats.num_generation_tokens:
            self._generation_tokens.inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens_iter:
            self._ttft.observe(ttft)
        for itl in iteration_stats.inter_token_latencies_iter:
            self._itl.observe(itl)
        for finished in iteration_stats.finished_requests:
            self._success_counter(finished.finish_reason).inc()
            self._e2e.observe(finished.e2e_latency)
            self._req_prompt_tokens.observe(finished.num_prompt_tokens)
            self._req_generation_tokens.observe(finished.num_generation_tokens)

    def _record_spec(self, spec: SpecDecodingCounts) -> None:
        self._spec_drafts.inc(spec.num_drafts)
        self._spec_draft_tokens.inc(spec.num_draft_tokens)
        self._spec_accepted.inc(spec.num_accepted_tokens)
        per_pos = self._metrics.spec_decode_num_accepted_tokens_per_pos
        while len(self._spec_per_pos) < len(spec.accepted_per_position):
            self._spec_per_pos.append(per_pos.labels(*self._labels, str(len(self._spec_per_pos))))
        for child, n in zip(self._spec_per_pos, spec.accepted_per_position, strict=False):
            if n:
                child.inc(n)

    def log_engine_initialized(self) -> None:
        cache = getattr(self.config, "cache_config", None)
        self._metrics.cache_config_info.labels(
            *self._labels,
            str(getattr(cache, "block_size", "")),
            str(getattr(cache, "num_blocks", "")),
        ).set(1)
