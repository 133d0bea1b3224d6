"""The start-up warm-up (engine/worker/warm_up.py): it runs the step kinds the
first requests hit and leaves nothing behind."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.cli.main import build_parser
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.worker.warm_up import MAX_DECODE_BATCH, MAX_PREFILL_TOKENS, warm_up_steps

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Foo:\n    def"]


def _config(max_num_seqs: int = 256, budget: int = 4096, max_len: int = 1024) -> EngineConfig:
    return EngineConfig(
        model_config=ModelConfig(model="m", max_model_len=max_len),
        cache_config=CacheConfig(block_size=16),
        scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=budget),
    )


def test_warm_up_steps_cover_prefill_chunk_and_decode_buckets():
    steps = list(warm_up_steps(_config(), num_blocks=64, vocab_size=100))
    prefill, chunked, *decodes, last = steps
    assert sum(len(s.token_ids) for s in prefill.scheduled) == MAX_PREFILL_TOKENS
    assert all(s.num_computed_tokens == 0 for s in prefill.scheduled)
    # a chunk over a cached context and a decode in one step
    assert sorted(len(s.token_ids) > 1 and s.num_computed_tokens > 0
                  for s in chunked.scheduled) == [False, True]
    assert [len(s.scheduled) for s in decodes] == [1, 2, 4, 8, 16, 32, MAX_DECODE_BATCH]
    assert all(len(s.token_ids) == 1 for step in decodes for s in step.scheduled)
    # never a request's id, every one dropped at the end, every block a real one
    seen = {s.seq_id for step in steps for s in step.scheduled}
    assert all(i < 0 for i in seen) and set(last.finished_seq_ids) == seen
    assert not last.scheduled
    assert all(0 <= b < 64 for step in steps for s in step.scheduled for b in s.block_table)
    tokens = [t for step in steps for s in step.scheduled for t in s.token_ids]
    assert all(0 <= t < 100 for t in tokens)


def test_warm_up_steps_fit_small_limits():
    steps = list(warm_up_steps(_config(max_num_seqs=3, budget=40, max_len=20),
                               num_blocks=2, vocab_size=10))
    for step in steps[:-1]:
        assert len(step.scheduled) <= 3
        assert sum(len(s.token_ids) for s in step.scheduled) <= 40
        for s in step.scheduled:
            assert s.num_computed_tokens + len(s.token_ids) <= 20
            assert len(s.block_table) * 16 >= s.num_computed_tokens + len(s.token_ids)
    assert [len(s.scheduled) for s in steps[2:-1]] == [1, 2, 3]


def test_warm_up_leaves_no_state_and_changes_no_output(make_hf_model):
    """Outputs (greedy, seeded and unseeded sampling) equal those of an engine
    that skipped the warm-up; no block, prefix-cache entry, statistic or
    sequence state is left."""
    model = make_hf_model("llama")
    params = [SamplingParams(max_tokens=12, temperature=0.0),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3),
              SamplingParams(max_tokens=12, temperature=0.9)]  # the global generator
    outputs = {}
    for skip in (True, False):
        with LLM(model, dtype="float32", skip_warm_up=skip, log_stats=True) as llm:
            engine = llm.llm_engine
            runner = engine.executor.worker.model_runner
            if not skip:
                assert runner.states == {}
                assert engine.kv_cache_usage() == 0.0
                kv = engine.scheduler.kv_cache
                assert kv.cached_blocks == {} and kv.num_free_blocks == kv.num_blocks
                assert engine.scheduler.prefix_cache_queried_tokens == 0
                assert engine.scheduler.make_stats().num_running_reqs == 0
            outputs[skip] = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, p)]
                             for p in params]
    assert outputs[False] == outputs[True]


def test_one_shot_commands_skip_the_warm_up_and_serve_runs_it():
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x"]).skip_warm_up is True
    assert parser.parse_args(["generate", "--prompt", "x", "--no-skip-warm-up"]).skip_warm_up \
        is False
    assert parser.parse_args(["embed", "x"]).skip_warm_up is True
    assert parser.parse_args(["serve"]).skip_warm_up is False
    assert parser.parse_args(["chat"]).skip_warm_up is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_warm_up_runs_in_each_dtype(make_hf_model, dtype, caplog):
    caplog.set_level("INFO", logger="engine.worker.model_runner")
    with LLM(make_hf_model("llama"), dtype=dtype) as llm:
        assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=4))[0].outputs[0].token_ids
    assert any("warm-up:" in r.getMessage() for r in caplog.records)
