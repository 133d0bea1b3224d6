"""The start-up warm-up (engine/worker/warm_up.py): it runs the step kinds the
first requests hit and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import onednn_packs_bf16, subprocess_env

from engine import LLM, SamplingParams
from engine.cli.main import build_parser
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine_args import EngineArgs
from engine.ops.linear import AMX_MAX_ROWS
from engine.utils import shape_bucket
from engine.worker import warm_up
from engine.worker.warm_up import (
    MAX_DECODE_BATCH,
    MAX_PREFILL_TOKENS,
    prefill_row_buckets,
    prompt_length_buckets,
    warm_up_attention,
    warm_up_linear_buckets,
    warm_up_steps,
)

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Foo:\n    def"]


@pytest.fixture(autouse=True)
def full_warm_up(monkeypatch):
    """This module checks the whole warm-up (the rest of the suite runs its steps only)."""
    monkeypatch.setenv("ENGINE_WARM_UP", "full")


@pytest.mark.parametrize("value, warm_up, shapes", [
    ("full", True, True), ("", True, True), (" Steps ", True, False), ("off", False, False),
])
def test_engine_warm_up_sets_how_much_of_the_warm_up_runs(make_hf_model, monkeypatch, value,
                                                          warm_up, shapes):
    monkeypatch.setenv("ENGINE_WARM_UP", value)
    config = EngineArgs(model=str(make_hf_model("llama"))).create_engine_config()
    assert (config.compilation_config.warm_up, config.compilation_config.warm_up_shapes) == \
        (warm_up, shapes)
    skipped = EngineArgs(model=str(make_hf_model("llama")), skip_warm_up=True)
    assert skipped.create_engine_config().compilation_config.warm_up is False


def test_engine_warm_up_rejects_an_unknown_extent_naming_the_variable(make_hf_model,
                                                                      monkeypatch):
    monkeypatch.setenv("ENGINE_WARM_UP", "fast")
    with pytest.raises(ValueError, match=r"ENGINE_WARM_UP must be one of full, steps, off, "
                                         r"got 'fast'"):
        EngineArgs(model=str(make_hf_model("llama"))).create_engine_config()


def test_steps_only_warm_up_runs_the_steps_and_no_shape_stage(make_hf_model, monkeypatch,
                                                             caplog):
    monkeypatch.setenv("ENGINE_WARM_UP", "steps")
    caplog.set_level("INFO", logger="engine.worker.model_runner")
    with LLM(make_hf_model("llama"), dtype="bfloat16") as llm:
        assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    lines = [r.getMessage() for r in caplog.records if "warm-up:" in r.getMessage()]
    assert len(lines) == 1 and "steps in" in lines[0] and "shape stages off" in lines[0], lines


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


def test_prefill_row_buckets_are_every_shape_a_prompt_step_reaches_onednn_with():
    buckets = prefill_row_buckets(4096)
    assert buckets == sorted({shape_bucket(r) for r in range(AMX_MAX_ROWS + 1, 4097)})
    assert buckets[0] > AMX_MAX_ROWS and buckets[-1] == 4096 and len(buckets) == 56
    assert all(shape_bucket(b) == b for b in buckets)
    assert prefill_row_buckets(AMX_MAX_ROWS) == []


def _packed_dtype() -> str:
    """A dtype whose linear weights this CPU packs for oneDNN (the layers the bucket
    warm-up runs): bfloat16 where it has bfloat16 arithmetic, else float32 (packed
    while the compiled kernels are loaded: the `compiled` fixture)."""
    return "bfloat16" if onednn_packs_bf16() else "float32"


def test_linear_buckets_run_each_distinct_layer_shape_within_the_flop_budget(make_hf_model,
                                                                           monkeypatch,
                                                                           compiled):
    """Every layer of a shape shares oneDNN's primitives: one call per distinct
    (weight shape, dtype, bias, fused activation) and bucket, as a prompt step
    makes it (the gate-up projection with SiLU-and-mul inside its matmuls),
    smallest buckets first, no further than the budget allows."""
    with LLM(make_hf_model("llama"), dtype=_packed_dtype(), skip_warm_up=True) as llm:
        model = llm.llm_engine.executor.worker.model_runner.model
        calls = []
        real_linear, real_gated = warm_up.packed_linear, warm_up.onednn_silu_and_mul

        def linear(x, packed, bias, weight, amx_packed):
            calls.append((x.shape[0], tuple(weight.shape), "linear"))
            return real_linear(x, packed, bias, weight, amx_packed)

        def gated(x, gate, up, gate_bias, up_bias):
            calls.append((x.shape[0], (gate.shape[0] + up.shape[0], x.shape[1]), "gated"))
            return real_gated(x, gate, up, gate_bias, up_bias)

        monkeypatch.setattr(warm_up, "packed_linear", linear)
        monkeypatch.setattr(warm_up, "onednn_silu_and_mul", gated)
        assert warm_up_linear_buckets(model, 4096, flop_budget=0) == 0 and not calls
        everything = prefill_row_buckets(1000)
        assert warm_up_linear_buckets(model, 1000, flop_budget=float("inf")) == len(everything)
        # hidden 64, intermediate 128, 4 heads (2 KV) of 16: qkv, o, gate_up, down
        shapes = {((128, 64), "linear"), ((64, 64), "linear"), ((256, 64), "gated"),
                  ((64, 128), "linear")}
        assert {c[1:] for c in calls} == shapes
        assert len(calls) == len(shapes) * len(everything)
        assert sorted({c[0] for c in calls}) == everything
        flops_per_row = 2 * sum(n * k for (n, k), _ in shapes)
        calls.clear()
        budget = flops_per_row * (everything[0] + everything[1])
        assert warm_up_linear_buckets(model, 1000, flop_budget=budget) == 2
        assert sorted({c[0] for c in calls}) == everything[:2]


def test_linear_buckets_stop_at_the_kv_cache_capacity(make_hf_model, caplog, compiled):
    """A step never computes more tokens than the KV cache has slots for (each
    writes its K and V), so the linear stage stops there below the step budget."""
    caplog.set_level("INFO", logger="engine.worker.model_runner")
    with LLM(make_hf_model("llama"), dtype=_packed_dtype(), kv_cache_memory=1 << 18,
             max_num_batched_tokens=4096) as llm:
        engine = llm.llm_engine
        capacity = engine.num_blocks * engine.config.cache_config.block_size
    assert AMX_MAX_ROWS < capacity < 4096
    line = next(r.getMessage() for r in caplog.records if "warm-up:" in r.getMessage())
    run = int(line.split(" linear row buckets")[0].rsplit(" ", 1)[1])
    assert run == len(prefill_row_buckets(capacity)), line


def test_prompt_length_buckets_are_the_lengths_sdpa_sees_for_fresh_prompts():
    lengths = prompt_length_buckets(512)
    assert lengths == sorted({shape_bucket(n) for n in range(2, 513)})
    assert lengths[:3] == [2, 3, 4] and lengths[-1] == 512 and len(lengths) == 55


def test_attention_warm_up_runs_each_distinct_layer_on_fresh_prompts_within_the_budget(
        make_hf_model, monkeypatch):
    """Through the backend's own forward on the layer's KV cache (a prompt with no
    cached context), one call per distinct layer shape and length, shortest first,
    never past the cache's blocks."""
    with LLM(make_hf_model("llama"), dtype="bfloat16", skip_warm_up=True,
             block_size=16) as llm:
        model = llm.llm_engine.executor.worker.model_runner.model
        layer = model.model.layers[0].self_attn.attn
        impl_cls = type(layer.impl)
        calls = []
        real = impl_cls.forward

        def recorded(self, layer, query, key, value, kv_cache, md):
            out = real(self, layer, query, key, value, kv_cache, md)
            calls.append((md.query_lens, md.seq_lens, kv_cache is layer.kv_cache,
                          md.block_tables.tolist(), query.dtype, tuple(out.shape)))
            return out

        monkeypatch.setattr(impl_cls, "forward", recorded)
        args = (model, 300, torch.bfloat16, 16, 64)
        assert warm_up_attention(*args, flop_budget=0) == 0 and not calls
        lengths = prompt_length_buckets(300)
        assert warm_up_attention(*args, flop_budget=float("inf")) == len(lengths)
        # the model's two layers share a shape (4 heads of 16): one call per length
        assert calls == [([n], [n], True, [list(range(-(-n // 16)))], torch.bfloat16, (n, 64))
                         for n in lengths]
        calls.clear()
        budget = 2 * 64 * (lengths[0] ** 2 + lengths[1] ** 2)
        assert warm_up_attention(*args, flop_budget=budget) == 2
        assert [c[0] for c in calls] == [[lengths[0]], [lengths[1]]]
        # a cache of 5 blocks of 16 holds prompts of up to 80 tokens
        calls.clear()
        warm_up_attention(model, 300, torch.bfloat16, 16, 5, flop_budget=float("inf"))
        assert max(c[0][0] for c in calls) == max(prompt_length_buckets(80))


_FIRST_BATCH = textwrap.dedent("""
    import sys
    from engine import LLM, SamplingParams
    from engine.worker import warm_up
    warm_up.LINEAR_BUCKET_FLOPS = float(sys.argv[2])
    llm = LLM(sys.argv[1], dtype=sys.argv[3], max_num_batched_tokens=1024)
    print("=== first batch", flush=True)
    # one prompt step of 4 x 180 = 720 rows: larger than the warm-up's own steps
    prompts = [[3 + (7 * i + j) % 1000 for j in range(180)] for i in range(4)]
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    print("=== done", flush=True)
""")


@pytest.mark.parametrize(("flop_budget", "first_batch_builds"), [("1e12", False), ("0", True)])
def test_first_batch_after_the_warm_up_builds_no_onednn_primitive(make_hf_model, tmp_path,
                                                                 compiled, flop_budget,
                                                                 first_batch_builds):
    """oneDNN logs every primitive it creates (ONEDNN_VERBOSE=2): after the
    warm-up, a first prompt step larger than any warm-up step creates none; with
    the bucket warm-up given no budget, it does (what the first user paid). In
    bfloat16, or in float32 on a CPU that widens bf16 products (no oneDNN copy)."""
    script = tmp_path / "first_batch.py"
    script.write_text(_FIRST_BATCH)
    proc = subprocess.run(
        [sys.executable, str(script), str(make_hf_model("llama")), flop_budget, _packed_dtype()],
        env=subprocess_env(ONEDNN_VERBOSE="2", HF_HUB_OFFLINE="1", ENGINE_CPU_KERNELS="build"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_batch = proc.stdout.split("=== first batch")[1].split("=== done")[0]
    created = [line for line in first_batch.splitlines()
               if "create:cache_miss" in line and ",inner_product," in line]
    assert bool(created) == first_batch_builds, created[:4]
