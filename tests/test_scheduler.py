"""Scheduler: token budget, chunked prefill, FCFS, preemption, prefix reuse.

The model is replaced by its contract: every scheduled sequence that asks for a
sample gets token 7. That is all the scheduler sees of a model.
"""

from __future__ import annotations

import pickle
import random

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.core import ModelRunnerOutput, Scheduler, Sequence, SequenceStatus


def _scheduler(num_blocks=64, block_size=4, budget=32, max_num_seqs=8, chunked=True,
               prefix=True, max_model_len=256, policy="fcfs") -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        enable_chunked_prefill=chunked, scheduling_policy=policy),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
    )


def _seq(n_prompt: int, max_tokens: int = 4, first: int = 100, **kw) -> Sequence:
    return Sequence("r", list(range(first, first + n_prompt)), max_tokens=max_tokens, **kw)


def _step(sched: Scheduler):
    out = sched.schedule()
    sampled = [s.seq_id for s in out.scheduled if s.sample]
    results = sched.update_from_output(out, ModelRunnerOutput(sampled, [7] * len(sampled)))
    for seq, _, _ in results:
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish_sequence(seq, SequenceStatus.FINISHED_LENGTH)
    return out


def _run_to_end(sched: Scheduler, limit: int = 1000) -> list:
    outs = []
    while sched.has_unfinished():
        outs.append(_step(sched))
        assert len(outs) < limit
    return outs


def test_decodes_and_prefills_share_the_token_budget():
    sched = _scheduler(budget=16)
    a, b = _seq(10), _seq(10, first=200)
    sched.add_sequence(a)
    sched.add_sequence(b)
    out = _step(sched)
    assert [(s.seq_id, len(s.token_ids)) for s in out.scheduled] == [(a.seq_id, 10), (b.seq_id, 6)]
    assert [s.sample for s in out.scheduled] == [True, False]
    out = _step(sched)  # a decodes (1 token), b finishes its prompt (4 tokens)
    assert [(s.seq_id, len(s.token_ids)) for s in out.scheduled] == [(a.seq_id, 1), (b.seq_id, 4)]
    assert out.scheduled[1].num_computed_tokens == 6 and out.scheduled[1].sample
    assert out.num_batched_tokens == 5


def test_long_prompt_is_prefilled_in_chunks():
    sched = _scheduler(budget=8)
    seq = _seq(20, max_tokens=2)
    sched.add_sequence(seq)
    outs = _run_to_end(sched)
    chunks = [len(o.scheduled[0].token_ids) for o in outs]
    assert chunks == [8, 8, 4, 1]
    assert seq.output_token_ids == [7, 7]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    sched = _scheduler(num_blocks=128, budget=256, chunked=False)
    a = _seq(250, max_tokens=3)
    b = _seq(10, first=500)
    sched.add_sequence(a)
    sched.add_sequence(b)
    out = _step(sched)
    assert [s.seq_id for s in out.scheduled] == [a.seq_id]  # b's 10 tokens do not fit
    out = _step(sched)
    assert [len(s.token_ids) for s in out.scheduled] == [1, 10]


def test_chunking_off_needs_a_budget_of_a_whole_context():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        _scheduler(budget=16, chunked=False, max_model_len=64)


def test_admission_is_first_come_first_served_and_bounded_by_max_num_seqs():
    sched = _scheduler(max_num_seqs=2, budget=64)
    seqs = [_seq(3, max_tokens=2, first=10 * i) for i in range(4)]
    for s in seqs:
        sched.add_sequence(s)
    first = _step(sched)
    assert [s.seq_id for s in first.scheduled] == [seqs[0].seq_id, seqs[1].seq_id]
    _run_to_end(sched)
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in seqs)


def test_preemption_frees_the_newest_and_recomputes_it_later():
    # 6 blocks of 4 tokens; two sequences of 8 + 12 tokens cannot both finish
    sched = _scheduler(num_blocks=6, block_size=4, budget=64, prefix=False)
    a, b = _seq(8, max_tokens=12), _seq(8, max_tokens=12, first=300)
    sched.add_sequence(a)
    sched.add_sequence(b)
    outs = _run_to_end(sched)
    assert sched.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the newest goes first
    assert a.output_token_ids == [7] * 12 and b.output_token_ids == [7] * 12
    recompute = [s for o in outs for s in o.scheduled
                 if s.seq_id == b.seq_id and s.num_computed_tokens == 0 and len(s.token_ids) > 8]
    assert recompute, "the preempted sequence must be recomputed with its outputs"
    assert sched.kv_cache.num_free_blocks == 6


def test_request_that_can_never_fit_is_refused_alone():
    sched = _scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
        sched.add_sequence(_seq(10, max_tokens=10))
    with pytest.raises(ValueError, match="max_model_len=64"):
        sched.add_sequence(_seq(65))
    ok = _seq(4, max_tokens=4)
    sched.add_sequence(ok)
    _run_to_end(sched)
    assert ok.status is SequenceStatus.FINISHED_LENGTH


def test_repeated_prompt_prefix_skips_its_prefill():
    sched = _scheduler(block_size=4)
    first = _seq(13, max_tokens=1)
    sched.add_sequence(first)
    _run_to_end(sched)
    second = _seq(13, max_tokens=1)
    sched.add_sequence(second)
    out = _step(sched)
    assert second.num_cached_tokens == 12
    assert out.scheduled[0].num_computed_tokens == 12
    assert out.scheduled[0].token_ids == second.prompt_token_ids[12:]


def test_later_samples_of_a_request_wait_for_the_first_prefill():
    sched = _scheduler(block_size=4, budget=8)
    parent = _seq(18, max_tokens=2)
    child = _seq(18, max_tokens=2, index=1, parent=parent)
    sched.add_sequence(parent)
    sched.add_sequence(child)
    _run_to_end(sched)
    assert child.num_cached_tokens == 16
    assert child.output_token_ids == parent.output_token_ids == [7, 7]


def test_finished_sequences_are_reported_to_workers_once():
    sched = _scheduler()
    a = _seq(4, max_tokens=1)
    sched.add_sequence(a)
    _step(sched)
    assert a.is_finished
    out = sched.schedule()
    assert out.finished_seq_ids == [a.seq_id] and out.is_empty
    assert sched.schedule().finished_seq_ids == []


def test_aborting_a_waiting_sequence_never_reaches_workers():
    sched = _scheduler()
    a = _seq(4)
    sched.add_sequence(a)
    sched.finish_sequence(a, SequenceStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert out.is_empty and out.finished_seq_ids == []
    assert a.status.finish_reason == "abort"


def test_scheduler_output_is_picklable():
    sched = _scheduler()
    sched.add_sequence(_seq(6))
    out = sched.schedule()
    assert pickle.loads(pickle.dumps(out)) == out


def test_stats_count_each_step_once():
    sched = _scheduler(block_size=4)
    first = _seq(9, max_tokens=1)
    sched.add_sequence(first)
    _run_to_end(sched)
    sched.make_stats()
    sched.add_sequence(_seq(9, max_tokens=1))
    sched.add_sequence(_seq(3, max_tokens=1, first=900))
    sched.schedule()
    stats = sched.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (2, 0)
    cache = stats.prefix_cache_stats
    assert (cache.queries, cache.hits) == (12, 8)
    assert 0 < stats.kv_cache_usage <= 1
    again = sched.make_stats()
    assert again.prefix_cache_stats.queries == 0 and again.num_preemptions == 0


def test_a_many_sample_request_cannot_starve_a_later_one_token_request():
    # request "big" asks for 16 samples with 4 slots; "small" (one token) arrives
    # while big holds every slot: it must get the first slot that frees, not wait
    # for big's other 12 samples
    sched = _scheduler(max_num_seqs=4, budget=64)
    parent = Sequence("big", list(range(100, 103)), max_tokens=8)
    big = [parent] + [Sequence("big", list(range(100, 103)), max_tokens=8, index=i,
                               parent=parent) for i in range(1, 16)]
    for seq in big:
        sched.add_sequence(seq)
    for _ in range(3):
        _step(sched)
    assert len(sched.running) == 4
    small = Sequence("small", [5, 6, 7], max_tokens=1)
    sched.add_sequence(small)
    steps = 0
    while not small.is_finished:
        _step(sched)
        steps += 1
        assert steps <= 10, "the one-token request waited behind the 16-sample one"
    _run_to_end(sched)
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in big)


def test_fair_share_leaves_slots_to_a_lone_request():
    # with no other request waiting, one request fills every slot
    sched = _scheduler(max_num_seqs=4, budget=64, prefix=False)
    seqs = [Sequence("only", [1, 2, 3], max_tokens=2, index=i) for i in range(6)]
    for seq in seqs:
        sched.add_sequence(seq)
    first = _step(sched)
    assert len(first.scheduled) == 4


def _first_token_steps(sched: Scheduler, seqs: list[Sequence]) -> list[int]:
    """The step (1, 2, ...) at which each of `seqs` got its first token."""
    first: dict[int, int] = {}
    for step, out in enumerate(_run_to_end(sched), 1):
        for item in out.scheduled:
            if item.sample:
                first.setdefault(item.seq_id, step)
    return [first[seq.seq_id] for seq in seqs]


def test_short_prompt_first_hands_out_first_tokens_in_fewer_steps():
    # prompts of 40, 8, 30, 6, 12 tokens arriving together, a budget of 32 per step
    lengths = [40, 8, 30, 6, 12]
    steps = {}
    for policy in ("fcfs", "short-prompt-first"):
        sched = _scheduler(num_blocks=128, budget=32, policy=policy, prefix=False)
        seqs = [_seq(n, max_tokens=2, first=1000 * i) for i, n in enumerate(lengths)]
        for seq in seqs:
            sched.add_sequence(seq)
        steps[policy] = _first_token_steps(sched, seqs)
        assert all(seq.output_token_ids == [7, 7] for seq in seqs)
    # fcfs: the 40-token prompt takes the whole first step, everyone waits behind it
    assert steps["fcfs"] == [2, 2, 3, 3, 4]
    # shortest first: 6 + 8 + 12 fit the first step; 30 and then 40 follow
    assert steps["short-prompt-first"] == [4, 1, 2, 1, 1]
    assert sum(steps["short-prompt-first"]) < sum(steps["fcfs"])


def test_short_prompt_first_never_passes_an_earlier_arrival():
    sched = _scheduler(num_blocks=128, budget=16, policy="short-prompt-first", prefix=False)
    long_early = _seq(30, max_tokens=3)
    sched.add_sequence(long_early)
    _step(sched)  # long_early's first chunk
    short_late = _seq(4, max_tokens=3, first=500)
    long_late = _seq(20, max_tokens=3, first=900)
    sched.add_sequence(long_late)
    sched.add_sequence(short_late)  # after long_late, same group: goes before it
    assert list(sched.waiting) == [short_late, long_late]
    out = _step(sched)  # long_early (running) goes on first, then short_late
    assert [item.seq_id for item in out.scheduled][:2] == [long_early.seq_id,
                                                           short_late.seq_id]
    # a preempted sequence at the front keeps its place before new arrivals
    sched2 = _scheduler(num_blocks=128, budget=64, policy="short-prompt-first", prefix=False)
    a = _seq(10, max_tokens=2)
    sched2.add_sequence(a)
    _step(sched2)
    sched2._preempt(a)
    b = _seq(3, max_tokens=2, first=300)
    sched2.add_sequence(b)
    assert list(sched2.waiting) == [a, b]
    _run_to_end(sched2)
    assert a.output_token_ids == [7, 7] and b.output_token_ids == [7, 7]


def test_unknown_scheduling_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, "
                                         "short-prompt-first, got 'lifo'"):
        _scheduler(policy="lifo")


def test_short_prompt_first_keeps_each_group_sorted_and_stable():
    rng = random.Random(0)
    sched = _scheduler(num_blocks=4096, budget=8, policy="short-prompt-first", prefix=False)
    first = [_seq(rng.randint(1, 40), first=1000 * i) for i in range(100)]
    for seq in first:
        sched.add_sequence(seq)
    # sorted by prompt length; equal lengths in arrival order
    assert list(sched.waiting) == sorted(first, key=lambda s: s.num_prompt_tokens)
    _step(sched)
    later = [_seq(rng.randint(1, 40), first=200_000 + 1000 * i) for i in range(50)]
    for seq in later:
        sched.add_sequence(seq)
    waiting = list(sched.waiting)
    # the later group stays behind the whole earlier one, sorted within itself
    assert waiting[-50:] == sorted(later, key=lambda s: s.num_prompt_tokens)
    assert set(waiting[:-50]) <= set(first)
