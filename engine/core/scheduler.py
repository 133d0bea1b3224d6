"""Continuous-batching scheduler.

Each step gets a token budget (``max_num_batched_tokens``). Running sequences
go first (decodes, and the next chunk of prompts being prefilled in chunks),
oldest first; then waiting sequences are admitted in arrival order while the
budget, ``max_num_seqs`` and free KV blocks allow, except that a request
holding its fair share of the running slots (``max_num_seqs`` over the
requests with sequences in either queue) lets other requests' sequences go
first: a request's ``n`` samples cannot keep a one-token request waiting.
With ``scheduling_policy="short-prompt-first"`` (`engine serve`'s default) the
waiting requests that reached the engine between the same two steps are admitted
shortest prompt first: when many prompts arrive together, the short ones get
their first token in the first steps instead of waiting behind long ones, and no
request is ever passed by one that arrived after the step it arrived before
(``"fcfs"``: plain arrival order, offline `LLM`'s default).
When a running sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of
the waiting queue to be recomputed later (prefix caching usually makes that
cheap).

What the scheduler sends to the workers (`engine.step.SchedulerOutput`) is plain
data: lists and ints, picklable, so a worker may live in another process.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from typing import Any

from engine.config import SCHEDULING_POLICIES, CacheConfig, SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.sequence import Sequence, SequenceStatus
from engine.spec_decode.stats import SpecDecodingCounts
from engine.step import (
    DraftTokenIds,
    ModelRunnerOutput,
    NewSequenceData,
    ScheduledSequence,
    SchedulerOutput,
)

# the most steps a sequence whose drafts keep being refused waits between tries
_MAX_SPEC_BACKOFF = 8


def _count_loras(seqs: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seq in seqs:
        if seq.lora_request is not None:
            counts[seq.lora_request.name] = counts.get(seq.lora_request.name, 0) + 1
    return counts


class Scheduler:
    """Owns the waiting and running queues; the only place sequences change state."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
    ) -> None:
        if not scheduler_config.enable_chunked_prefill and (
            scheduler_config.max_num_batched_tokens < max_model_len
        ):
            raise ValueError(
                f"max_num_batched_tokens ({scheduler_config.max_num_batched_tokens}) must be "
                f">= max_model_len ({max_model_len}) when chunked prefill is off, or a long "
                "prompt could never be scheduled; raise it or enable chunked prefill"
            )
        if scheduler_config.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got "
                f"{scheduler_config.scheduling_policy!r}")
        self.config = scheduler_config
        self.num_steps = 0  # schedule() calls: a waiting sequence's arrival group
        self.max_model_len = max_model_len
        self.kv_cache = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seen: set[int] = set()  # sequences the workers already know
        self._finished_ids: list[int] = []  # to tell the workers at the next step
        self.eos_token_ids: list[int] = []  # passed to the workers' sampling states
        self.num_preemptions = 0  # totals, for stats and tests
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self._stats_builder: Any = None  # engine.metrics SchedulerStatsBuilder, on first use
        # speculative decoding: drafts per sequence at most (0: off), and totals
        self.num_speculative_tokens = 0
        self.spec_stats = SpecDecodingCounts()  # since the start
        self._spec_step_stats = SpecDecodingCounts()  # since the last make_stats
        self.max_loras: int | None = None  # LoRA: adapters one step may mix (None: off)
        self.pinned_loras: set[int] = set()  # LoRA: ids that hold a slot for good

    # ------------------------------------------------------------------ requests

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError when a sequence this long could never be scheduled."""
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty: at least one token is needed")
        if num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens, more than the model's "
                f"context length max_model_len={self.max_model_len}"
            )
        kv = self.kv_cache
        needed = kv.num_blocks_for(min(num_prompt_tokens + max_tokens, self.max_model_len))
        if needed > kv.num_blocks:
            raise ValueError(
                f"the KV cache holds {kv.num_blocks * kv.block_size} tokens "
                f"({kv.num_blocks} blocks of {kv.block_size}); this request needs up to "
                f"{needed * kv.block_size}: give the cache more memory (kv_cache_memory) "
                "or lower max_tokens"
            )

    def add_sequence(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.max_tokens)
        seq.arrival_step = self.num_steps
        if self.config.scheduling_policy == "fcfs":
            self.waiting.append(seq)
            return
        # short-prompt-first: before the longer prompts that arrived since the last
        # step (never before an earlier arrival, a preempted or a deferred sequence).
        # That group is the queue's tail (the others go to its front), kept sorted
        # by prompt length: two binary searches, not a walk, as thousands may come
        # at once
        group = bisect.bisect_left(
            self.waiting, True,
            key=lambda s: s.arrival_step == seq.arrival_step and not s.num_preemptions)
        at = bisect.bisect_right(self.waiting, seq.num_prompt_tokens, lo=group,
                                 key=lambda s: s.num_prompt_tokens)
        self.waiting.insert(at, seq)

    def finish_sequence(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take ``seq`` out of the queues for good and free its blocks."""
        assert status.is_finished, status
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return  # already finished
        seq.status = status
        self.kv_cache.free(seq)
        if seq.seq_id in self._seen:
            self._seen.discard(seq.seq_id)
            self._finished_ids.append(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ a step

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and how many tokens of each to compute."""
        self.num_steps += 1
        out = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_waiting(out)
        out.num_preempted = preempted
        return out

    def update_draft_token_ids(self, drafts: DraftTokenIds | None) -> None:
        """Keep the proposer's guesses for the next step (running sequences only)."""
        if drafts is None:
            return
        by_id = {seq.seq_id: seq for seq in self.running}
        for seq_id, tokens in zip(drafts.seq_ids, drafts.draft_token_ids, strict=True):
            seq = by_id.get(seq_id)
            if seq is not None:
                seq.spec_token_ids = list(tokens[: self.num_speculative_tokens])

    def _num_drafts(self, seq: Sequence, budget: int) -> int:
        """How many of ``seq``'s drafts fit this step: a decoding sequence only,
        within the step's budget and the tokens the sequence may still produce."""
        if not seq.spec_token_ids or seq.num_computed_tokens != seq.num_tokens - 1:
            return 0
        if seq.spec_wait:
            seq.spec_wait -= 1
            return 0
        room = seq.max_tokens - seq.num_output_tokens - 1
        limit = seq.spec_limit or self.num_speculative_tokens
        return max(0, min(len(seq.spec_token_ids), budget - 1, room, limit))

    def _adapt_drafts(self, seq: Sequence, num_drafts: int, kept: int) -> None:
        """Size ``seq``'s next drafts from how its last ones fared. Every draft
        costs a row of the verifying forward pass whether it is kept or not, so
        the limit doubles (up to num_speculative_tokens) while all are kept,
        halves while none is, and stays after a partial refusal (a copied text
        that changed a word goes on being copied). Refused at a limit of 1, the
        sequence waits a few steps without drafts (doubling, up to
        _MAX_SPEC_BACKOFF)."""
        limit = seq.spec_limit or self.num_speculative_tokens
        if kept:
            seq.spec_backoff = 0
            if kept == num_drafts:
                seq.spec_limit = min(self.num_speculative_tokens, 2 * limit)
        elif limit > 1:
            seq.spec_limit = limit // 2
        else:
            seq.spec_backoff = min(2 * seq.spec_backoff or 1, _MAX_SPEC_BACKOFF)
            seq.spec_wait = seq.spec_backoff

    def _chunk(self, seq: Sequence, num_computed: int, budget: int) -> int:
        """How many of the tokens after ``num_computed`` to compute in this step."""
        num_new = seq.num_tokens - num_computed
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0:
            num_new = min(num_new, threshold)
        return min(num_new, budget)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        num_preempted = 0
        i = 0
        while i < len(self.running) and out.num_batched_tokens < budget:
            seq = self.running[i]
            num_drafts = self._num_drafts(seq, budget - out.num_batched_tokens)
            seq.spec_token_ids, drafts = [], seq.spec_token_ids[:num_drafts]
            if drafts and self.kv_cache.allocate_slots(seq, 1 + num_drafts):
                self._add_to_output(out, seq, 1, drafts)
                i += 1
                continue  # no room for the drafts: decode one token as usual
            num_new = self._chunk(seq, seq.num_computed_tokens, budget - out.num_batched_tokens)
            while not self.kv_cache.allocate_slots(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
            else:
                self._add_to_output(out, seq, num_new)
                i += 1
        return num_preempted

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        budget = self.config.max_num_batched_tokens
        deferred: list[Sequence] = []
        # fairness across requests: sequences per request, running and waiting
        running_per_request = Counter(seq.request_id for seq in self.running)
        waiting_per_request = Counter(seq.request_id for seq in self.waiting)
        num_waiting = len(self.waiting)
        fair_share = max(1, self.config.max_num_seqs
                         // max(1, len(running_per_request | waiting_per_request)))
        while (
            self.waiting
            and out.num_batched_tokens < budget
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if self._waits_for_parent(seq) or self._lora_slots_full(seq) or (
                    running_per_request[seq.request_id] >= fair_share
                    and num_waiting > waiting_per_request[seq.request_id]):
                deferred.append(self.waiting.popleft())
                continue
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(seq)
            remaining = budget - out.num_batched_tokens
            num_new = seq.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > remaining:
                break
            num_new = self._chunk(seq, num_cached, remaining)
            if not self.kv_cache.allocate_slots(seq, num_new, computed_blocks):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
            self.prefix_cache_queried_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            running_per_request[seq.request_id] += 1
            waiting_per_request[seq.request_id] -= 1
            num_waiting -= 1
            self._add_to_output(out, seq, num_new)
        self.waiting.extendleft(reversed(deferred))

    def _waits_for_parent(self, seq: Sequence) -> bool:
        """A later sample of a request waits until the first one has computed the
        prompt, so that it takes the prompt's blocks from the prefix cache."""
        parent = seq.parent
        return (
            parent is not None
            and self.kv_cache.enable_prefix_caching
            and not parent.is_finished
            and parent.num_computed_tokens < parent.num_prompt_tokens
        )

    def _lora_slots_full(self, seq: Sequence) -> bool:
        """LoRA: `seq`'s adapter would be one more than a step may mix."""
        lora = seq.lora_request
        if lora is None or self.max_loras is None:
            return False
        running = {s.lora_request.int_id for s in self.running if s.lora_request is not None}
        running |= self.pinned_loras
        return lora.int_id not in running and len(running) >= self.max_loras

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _add_to_output(self, out: SchedulerOutput, seq: Sequence, num_new: int,
                       drafts: list[int] | None = None) -> None:
        start = seq.num_computed_tokens
        if seq.seq_id not in self._seen:
            self._seen.add(seq.seq_id)
            out.new_seqs.append(
                NewSequenceData(
                    seq.seq_id, seq.prompt_token_ids, seq.sampling_params, seq.index,
                    self.eos_token_ids, seq.lora_request,
                )
            )
        out.scheduled.append(
            ScheduledSequence(
                seq_id=seq.seq_id,
                token_ids=seq.token_ids[start : start + num_new] + (drafts or []),
                num_computed_tokens=start,
                block_table=list(seq.block_table),
                sample=start + num_new == seq.num_tokens,
                num_draft_tokens=len(drafts or ()),
            )
        )
        out.num_batched_tokens += num_new + len(drafts or ())

    def make_stats(self) -> Any:
        """An `engine.metrics.SchedulerStats` snapshot; counters cover the time
        since the previous call (one engine step)."""
        if self._stats_builder is None:
            from engine.metrics.stats import SchedulerStatsBuilder

            self._stats_builder = SchedulerStatsBuilder()
        stats = self._stats_builder.build(
            len(self.running), len(self.waiting), self.kv_cache.usage, self.num_preemptions,
            self.prefix_cache_queried_tokens, self.prefix_cache_hit_tokens,
            self._spec_step_stats.take() if self.num_speculative_tokens else None,
        )
        if self.max_loras is not None:  # LoRA: requests per adapter
            stats.running_lora_adapters = _count_loras(self.running)
            stats.waiting_lora_adapters = _count_loras(self.waiting)
        return stats

    # ------------------------------------------------------------------ results

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[tuple[Sequence, int, dict[int, float] | None]]:
        """Advance the computed-token counts, cache the blocks that became full and
        append the sampled tokens. Returns ``(sequence, token_id, logprobs)`` per
        sampled token; the caller decides which sequences stop."""
        by_id = {seq.seq_id: seq for seq in self.running}
        results: list[tuple[Sequence, int, dict[int, float] | None]] = []
        logprobs = runner_output.logprobs
        accepted_lists = runner_output.accepted_token_ids
        num_accepted: dict[int, int] = {}
        for j, (seq_id, token_id) in enumerate(
            zip(runner_output.seq_ids, runner_output.sampled_token_ids, strict=True)
        ):
            seq = by_id.get(seq_id)
            if seq is None:  # finished (aborted) while the step ran
                continue
            accepted = accepted_lists[j] if accepted_lists is not None else ()
            num_accepted[seq_id] = len(accepted)
            for token in accepted:  # kept drafts: their logprobs are not computed
                seq.append_token(token)
                results.append((seq, token, None))
            seq.append_token(token_id)
            results.append((seq, token_id, logprobs[j] if logprobs is not None else None))
        for item in scheduler_output.scheduled:
            seq = by_id.get(item.seq_id)
            if seq is None:
                continue
            num_drafts = item.num_draft_tokens
            kept = num_accepted.get(item.seq_id, 0)
            seq.num_computed_tokens = (item.num_computed_tokens + len(item.token_ids)
                                       - num_drafts + kept)
            if num_drafts:
                # the refused drafts' slots hold K/V of the wrong tokens: they lie past
                # num_computed_tokens (never cached, overwritten by the next step), and
                # blocks holding nothing else go back to the pool
                self.kv_cache.trim(seq, seq.num_tokens)
                self.spec_stats.record(num_drafts, kept)
                self._adapt_drafts(seq, num_drafts, kept)
                self._spec_step_stats.record(num_drafts, kept)
            self.kv_cache.cache_full_blocks(seq)
        return results
