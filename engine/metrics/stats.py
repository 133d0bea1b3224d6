"""Statistics the engine produces each step, and the helper that fills them.

Two records reach every stat logger once per engine step:

- `SchedulerStats`: a snapshot of the scheduler (queue lengths, KV-cache usage,
  prefix-cache lookups, preemptions) built by the scheduler;
- `IterationStats`: what happened to requests during the step (tokens, time to
  first token, inter-token latencies, finished requests), filled by
  `RequestStatsTracker`.

How the engine drives them (all times are ``time.monotonic()`` seconds)::

    tracker = RequestStatsTracker()                       # once, when log_stats is on
    sched_stats = SchedulerStatsBuilder()
    stat_loggers = engine.metrics.build_stat_loggers(config)
    stat_loggers.log_engine_initialized()                 # after the KV cache is sized

    # LLMEngine.add_request:
    tracker.on_request_added(req_id, time.monotonic(), len(prompt_token_ids))

    # LLMEngine.step, after the scheduler has applied the model output:
    now = time.monotonic()
    for req_id, num_new_tokens in new_tokens_this_step:   # sum over the n sequences
        tracker.on_tokens(req_id, num_new_tokens, now)
    for req_id, finish_reason in finished_this_step:      # also "abort" for aborted ones
        tracker.on_finished(req_id, finish_reason, now)
    stat_loggers.record(
        sched_stats.build(                                # a SchedulerStatsBuilder
            len(scheduler.running), len(scheduler.waiting), scheduler.kv_cache.usage,
            scheduler.num_preemptions, scheduler.prefix_cache_queried_tokens,
            scheduler.prefix_cache_hit_tokens,
        ),
        tracker.take_iteration_stats(now),
    )

    # shutdown:
    stat_loggers.shutdown()                               # final log() of every logger

A request's prompt tokens are counted in the step that produces its first token
(so a chunked prefill is counted once, when it completes). Every call is a few
dictionary and list operations: cheap enough to run on every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.spec_decode.stats import SpecDecodingCounts


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups during one step, counted in tokens."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache

    @property
    def hit_rate(self) -> float:
        """hits / queries, 0.0 when nothing was looked up."""
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class SchedulerStats:
    """The scheduler's state after one step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    num_preemptions: int = 0  # preemptions during this step
    # speculative decoding during this step; None when the engine does not speculate
    spec_decoding_stats: SpecDecodingCounts | None = None


@dataclass(slots=True)
class FinishedRequestStats:
    """One request that finished (or was aborted) during a step."""

    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | ...
    e2e_latency: float  # seconds from arrival to finish
    num_prompt_tokens: int
    num_generation_tokens: int
    time_to_first_token: float | None  # None when it produced no token
    decode_time: float  # seconds from first to last token


@dataclass(slots=True)
class IterationStats:
    """What happened to requests during one step."""

    iteration_timestamp: float = 0.0
    num_prompt_tokens: int = 0  # prompts whose first token came this step
    num_generation_tokens: int = 0
    time_to_first_tokens_iter: list[float] = field(default_factory=list)
    inter_token_latencies_iter: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


class _RequestTimes:
    __slots__ = ("arrival", "num_prompt_tokens", "num_generation_tokens", "first_token", "last_token")

    def __init__(self, arrival: float, num_prompt_tokens: int) -> None:
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generation_tokens = 0
        self.first_token: float | None = None
        self.last_token = arrival


class RequestStatsTracker:
    """Keeps per-request timing and turns engine events into `IterationStats`.

    See the module docstring for the calls the engine makes. Events for a request
    id the tracker never saw (added before stats were switched on) are ignored.
    """

    def __init__(self) -> None:
        self._requests: dict[str, _RequestTimes] = {}
        self._iteration = IterationStats()

    @property
    def num_tracked(self) -> int:
        """Requests added and not finished yet."""
        return len(self._requests)

    def on_request_added(self, req_id: str, now: float, num_prompt_tokens: int) -> None:
        """A request entered the engine at `now` with `num_prompt_tokens` prompt tokens."""
        self._requests[req_id] = _RequestTimes(now, num_prompt_tokens)

    def on_tokens(self, req_id: str, num_new_tokens: int, now: float) -> None:
        """`req_id` produced `num_new_tokens` (>= 1) output tokens in this step."""
        req = self._requests.get(req_id)
        if req is None or num_new_tokens <= 0:
            return
        it = self._iteration
        if req.first_token is None:
            req.first_token = now
            it.num_prompt_tokens += req.num_prompt_tokens
            it.time_to_first_tokens_iter.append(now - req.arrival)
        else:
            it.inter_token_latencies_iter.append(now - req.last_token)
        req.last_token = now
        req.num_generation_tokens += num_new_tokens
        it.num_generation_tokens += num_new_tokens

    def on_finished(self, req_id: str, finish_reason: str, now: float) -> None:
        """`req_id` finished with `finish_reason` ("stop", "length", "abort", ...)."""
        req = self._requests.pop(req_id, None)
        if req is None:
            return
        first = req.first_token
        self._iteration.finished_requests.append(
            FinishedRequestStats(
                request_id=req_id,
                finish_reason=finish_reason,
                e2e_latency=now - req.arrival,
                num_prompt_tokens=req.num_prompt_tokens,
                num_generation_tokens=req.num_generation_tokens,
                time_to_first_token=None if first is None else first - req.arrival,
                decode_time=0.0 if first is None else req.last_token - first,
            )
        )

    def take_iteration_stats(self, now: float) -> IterationStats:
        """The stats gathered since the previous call, stamped `now`; starts a fresh record."""
        it, self._iteration = self._iteration, IterationStats()
        it.iteration_timestamp = now
        return it


class SchedulerStatsBuilder:
    """Builds per-step `SchedulerStats` from a scheduler that keeps running totals
    (preemptions, prefix-cache tokens queried and hit): it reports the change since
    the previous `build`."""

    def __init__(self) -> None:
        self._preemptions = 0
        self._queries = 0
        self._hits = 0

    def build(
        self,
        num_running_reqs: int,
        num_waiting_reqs: int,
        kv_cache_usage: float,
        total_preemptions: int,
        total_prefix_queries: int,
        total_prefix_hits: int,
        spec_decoding_stats: SpecDecodingCounts | None = None,
    ) -> SchedulerStats:
        """This step's stats, given the scheduler's queue lengths, KV usage and totals
        (and this step's speculative-decoding counts, when the engine speculates)."""
        stats = SchedulerStats(
            num_running_reqs=num_running_reqs,
            num_waiting_reqs=num_waiting_reqs,
            kv_cache_usage=kv_cache_usage,
            prefix_cache_stats=PrefixCacheStats(
                queries=total_prefix_queries - self._queries,
                hits=total_prefix_hits - self._hits,
            ),
            num_preemptions=total_preemptions - self._preemptions,
            spec_decoding_stats=spec_decoding_stats,
        )
        self._preemptions = total_preemptions
        self._queries = total_prefix_queries
        self._hits = total_prefix_hits
        return stats
