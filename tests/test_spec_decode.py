"""Speculative decoding: the output is the one plain decoding gives.

Greedy output with drafts (n-gram and draft-model proposers) must equal greedy
output without them token for token, whatever the engine does around them
(batches, chunked prefill, prefix-cache hits, preemption under a tiny KV cache,
TP=2, stop strings and max_tokens inside an accepted run). Sampled output must
keep the target's distribution, checked with a total-variation bound on a small
support. Every test also checks that drafts were proposed and kept, so a proposer
that never proposes cannot pass.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env

from engine import LLM, SamplingParams
from engine.platforms.cpu import cpu_has_native_bf16

KIB = 1024
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts (ids 3..1023) that repeat themselves, so n-grams match."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        motif = [rng.randrange(3, 1024) for _ in range(max(2, n // 3))]
        out.append((motif * 4)[:n])
    return out


def _spec_counts(llm: LLM):
    return llm.llm_engine.spec_decoding_stats


@pytest.fixture(scope="module")
def llama_dir(make_hf_model):
    return make_hf_model("llama")


GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _greedy(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def plain(llama_dir):
    with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB) as llm:
        yield llm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ngram_greedy_equals_plain_decoding(llama_dir, dtype):
    prompts = _prompts([5, 17, 40, 64, 9])
    with LLM(llama_dir, dtype=dtype, kv_cache_memory=4 * 1024 * KIB) as llm:
        expected = _greedy(llm, prompts)
    with LLM(llama_dir, dtype=dtype, kv_cache_memory=4 * 1024 * KIB,
             speculative_config=NGRAM) as llm:
        assert _greedy(llm, prompts) == expected
        counts = _spec_counts(llm)
        assert counts.num_draft_tokens > 0 and counts.num_accepted_tokens > 0


def test_ngram_with_chunked_prefill_prefix_hits_and_preemption(llama_dir, plain):
    prompts = _prompts([70, 33, 50, 21, 64, 45], seed=1)
    # the same prompts twice: the second round starts from prefix-cache hits
    prompts = prompts + [list(p) for p in prompts]
    expected = _greedy(plain, prompts)
    # 10 blocks of 16 tokens for 12 sequences of up to 102 tokens: preemptions,
    # and a step budget of 24 tokens: chunked prefills next to drafted decodes
    with LLM(llama_dir, dtype="float32", kv_cache_memory=10 * 16 * 2 * 2 * 2 * 32 * 4,
             max_num_batched_tokens=24, block_size=16, speculative_config=NGRAM) as llm:
        assert _greedy(llm, prompts) == expected
        assert llm.llm_engine.num_preemptions > 0
        assert _spec_counts(llm).num_accepted_tokens > 0
        assert llm.llm_engine.scheduler.kv_cache.usage == 0.0  # every block came back


def test_stop_conditions_inside_an_accepted_run(llama_dir, plain):
    prompts = _prompts([30, 24], seed=2)
    base = plain.generate(prompts, GREEDY, use_tqdm=False)
    # stop on a token and on a text the plain run produces in the middle of its output
    stop_token = base[0].outputs[0].token_ids[13]
    stop_text = base[1].outputs[0].text[20:24]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=32, stop=[stop_text]),
        SamplingParams(temperature=0.0, max_tokens=32, stop=[stop_text],
                       include_stop_str_in_output=True),
    ]
    expected = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason)
                 for o in plain.generate(prompts, p, use_tqdm=False) for c in o.outputs]
                for p in cases]
    with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
             speculative_config=NGRAM) as llm:
        got = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason)
                for o in llm.generate(prompts, p, use_tqdm=False) for c in o.outputs]
               for p in cases]
        assert _spec_counts(llm).num_accepted_tokens > 0
    assert got == expected


def test_draft_model_greedy_equals_plain_decoding(llama_dir, make_hf_model, plain):
    prompts = _prompts([12, 40, 25], seed=3)
    expected = _greedy(plain, prompts)
    # a different (random) draft model: few drafts kept, the output unchanged
    other = make_hf_model("llama", seed=7, num_hidden_layers=1)
    with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
             speculative_config={"model": str(other), "num_speculative_tokens": 3}) as llm:
        assert _greedy(llm, prompts) == expected
        assert _spec_counts(llm).num_draft_tokens > 0
    # the target as its own draft: every draft is kept. In bfloat16 where the CPU has
    # bf16 arithmetic; elsewhere (a plain AVX2 CPU) in float32: there the 4-token
    # verification's bf16 attention (SDPA) and the draft's one-token decode kernel
    # round differently, and 3 of 70 drafts were refused on equal-looking logits
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    with LLM(llama_dir, dtype=dtype, kv_cache_memory=4 * 1024 * KIB,
             speculative_config={"model": str(llama_dir), "num_speculative_tokens": 3}) as llm:
        with LLM(llama_dir, dtype=dtype, kv_cache_memory=4 * 1024 * KIB) as ref:
            assert _greedy(llm, prompts) == _greedy(ref, prompts)
        counts = _spec_counts(llm)
        assert counts.num_accepted_tokens == counts.num_draft_tokens > 0


def test_draft_model_single_token_steps_are_decode_row_steps(llama_dir, make_hf_model):
    """The draft's k one-token forwards say, as the target's decode steps do, that
    every sequence brings one row (`engine.quantization.step_rows`); its catch-up
    forwards of several tokens say they do not."""
    from engine.quantization import one_row_per_sequence

    other = make_hf_model("llama", seed=7, num_hidden_layers=1)
    seen = []
    with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
             speculative_config={"model": str(other), "num_speculative_tokens": 3}) as llm:
        draft = llm.llm_engine.executor.worker.model_runner.proposer.model
        draft.register_forward_pre_hook(
            lambda module, args: seen.append((args[2].max_query_len, one_row_per_sequence())))
        _greedy(llm, _prompts([12, 40, 25], seed=3))
    assert {flag for rows, flag in seen if rows == 1} == {True}, seen
    assert {flag for rows, flag in seen if rows > 1} == {False}, seen


def test_draft_model_drafts_fewer_tokens_while_its_guesses_fail(llama_dir, make_hf_model,
                                                               monkeypatch):
    """A draft forward per guess is paid whether the guess is kept or not: a draft
    model that keeps guessing wrong makes fewer guesses (down to one per step)."""
    from engine.spec_decode.draft_model import DraftModelProposer

    calls = collections.Counter()
    propose, forward = DraftModelProposer.propose, DraftModelProposer._forward

    def counted_propose(self, *args):
        calls["propose"] += 1
        return propose(self, *args)

    def counted_forward(self, seqs):
        calls["forward"] += 1
        return forward(self, seqs)

    monkeypatch.setattr(DraftModelProposer, "propose", counted_propose)
    monkeypatch.setattr(DraftModelProposer, "_forward", counted_forward)
    other = make_hf_model("llama", seed=7, num_hidden_layers=1)  # random: it guesses wrong
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
             speculative_config={"model": str(other), "num_speculative_tokens": 4}) as llm:
        _greedy(llm, _prompts([30], seed=8), params)
        counts = _spec_counts(llm)
    assert counts.num_draft_tokens > 0 and counts.acceptance_rate < 0.5, counts
    # four draft forwards per proposal without the adaptation
    assert calls["forward"] < 2 * calls["propose"], calls


def test_draft_model_stops_drafting_at_the_end_of_the_context(make_hf_model):
    # every draft is kept (the target drafts for itself), so drafting runs into the
    # 64-token context: no draft position may pass it
    short = make_hf_model("llama", max_position_embeddings=64)
    prompts = _prompts([40, 57], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    with LLM(short, dtype="float32", kv_cache_memory=4 * 1024 * KIB) as ref:
        expected = _greedy(ref, prompts, params)
    with LLM(short, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
             speculative_config={"model": str(short), "num_speculative_tokens": 4}) as llm:
        assert _greedy(llm, prompts, params) == expected
        assert _spec_counts(llm).num_accepted_tokens > 0
    assert [len(p) + len(e) for p, e in zip(prompts, expected, strict=True)] == [64, 64]


def test_seeded_sampling_with_drafts_is_deterministic(llama_dir):
    prompts = _prompts([20, 31], seed=4)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=24, seed=123,
                            ignore_eos=True)
    runs = []
    for _ in range(2):
        with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
                 speculative_config=NGRAM) as llm:
            runs.append(_greedy(llm, prompts, params))
            assert _spec_counts(llm).num_draft_tokens > 0
    assert runs[0] == runs[1]


def _joint_counts(llm: LLM, prompt: list[int], num: int) -> collections.Counter:
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, n=num, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return collections.Counter(tuple(c.token_ids[1:]) for c in out.outputs)


def _total_variation(a: collections.Counter, b: collections.Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def test_rejection_sampling_keeps_the_target_distribution(make_hf_model):
    # a 16-token vocabulary and a flat model (small weights): top-3 sampling spreads
    # over 3 tokens per position; the model is its own draft model, so each draft
    # is the target's likeliest token and is refused about half the time: both
    # branches of the rejection step run often
    model = make_hf_model("llama", seed=11, vocab_size=16, initializer_range=0.05)
    spec = {"model": str(model), "num_speculative_tokens": 2}
    ids = list(range(16))
    random.Random(5).shuffle(ids)
    prompt = ids + ids[::-1]
    num = 3000
    with LLM(model, dtype="float32", kv_cache_memory=32 * 1024 * KIB, max_num_seqs=512, max_n=num,
             seed=1) as llm:
        expected = _joint_counts(llm, prompt, num)
        noise = _joint_counts(llm, prompt, num)  # the plain run against itself: the noise floor
    with LLM(model, dtype="float32", kv_cache_memory=32 * 1024 * KIB, max_num_seqs=512, max_n=num,
             seed=2, speculative_config=spec) as llm:
        got = _joint_counts(llm, prompt, num)
        counts = _spec_counts(llm)
    assert counts.num_draft_tokens > 1000
    assert 0.1 < counts.acceptance_rate < 0.9, counts  # both branches ran often
    # 3000 draws over at most 9 outcomes: sampling noise stays under ~0.04
    assert _total_variation(noise, expected) < 0.05
    assert _total_variation(got, expected) < 0.05, (got, expected)


def test_worker_without_take_draft_token_ids_fails_at_start(llama_dir, tmp_path, monkeypatch):
    (tmp_path / "old_worker_mod.py").write_text(textwrap.dedent("""
        from engine.worker import WorkerBase

        class OldWorker(WorkerBase):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"method 'ngram'.*take_draft_token_ids.*OldWorker"):
        LLM(llama_dir, dtype="float32", worker_cls="old_worker_mod.OldWorker",
            speculative_config=NGRAM)


@pytest.mark.parametrize("bad, message", [
    ({"num_speculative_tokens": 2}, "needs \"method\""),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
      "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "nope", "num_speculative_tokens": 2}, "'nope' is not an available spec_proposer"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_config_is_refused_by_name(llama_dir, bad, message):
    with pytest.raises(ValueError, match=message):
        LLM(llama_dir, dtype="float32", speculative_config=bad)


def test_draft_model_with_tensor_parallelism_is_refused_at_start(llama_dir):
    with pytest.raises(ValueError, match="draft model runs with tensor_parallel_size=1"):
        LLM(llama_dir, dtype="float32", tensor_parallel_size=2,
            speculative_config={"model": str(llama_dir), "num_speculative_tokens": 2})


@pytest.mark.slow
def test_ngram_greedy_equals_plain_decoding_with_tp2(llama_dir, plain):
    prompts = _prompts([15, 40, 28], seed=6)
    expected = _greedy(plain, prompts)
    with LLM(llama_dir, dtype="float32", tensor_parallel_size=2, kv_cache_memory=4 * 1024 * KIB,
             speculative_config=NGRAM) as llm:
        assert _greedy(llm, prompts) == expected
        assert _spec_counts(llm).num_accepted_tokens > 0


def test_ngram_lookup_prefers_a_full_continuation():
    from engine.spec_decode.ngram import find_ngram_continuation

    assert find_ngram_continuation([1, 2, 3, 9, 1, 2], 1, 2, 3) == [3, 9, 1]
    assert find_ngram_continuation([5, 6, 7], 1, 3, 2) == []  # nothing repeats
    # a period-1 run: the latest match overlaps the suffix, an earlier one has room
    assert find_ngram_continuation([4, 4, 4, 4, 4], 1, 2, 2) == [4, 4]
    assert find_ngram_continuation([1, 2, 1, 2, 1], 2, 2, 4) == [2, 1]


def test_ngram_proposer_index_agrees_with_the_reference_lookup():
    from engine.spec_decode import SpeculativeConfig, TokenView
    from engine.spec_decode.ngram import NgramProposer, find_ngram_continuation

    rng = random.Random(0)
    for trial in range(300):
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 5)
        k = rng.randint(1, 5)
        spec = SpeculativeConfig.from_user({"method": "ngram", "num_speculative_tokens": k,
                                            "prompt_lookup_min": lo, "prompt_lookup_max": hi})
        proposer = NgramProposer(spec, None, "cpu")
        prompt = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        output: list[int] = []
        for _ in range(6):  # a sequence growing by a few tokens per step
            view = TokenView(prompt, output)
            assert proposer.propose([trial], [view]) == [
                find_ngram_continuation(prompt + output, lo, hi, k)]
            output += [rng.randrange(4) for _ in range(rng.randint(1, 4))]
        proposer.remove([trial])


# ------------------------------------------------------------------ a third-party proposer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "repeat-proposer"

ENGINE_SIDE = """
import json, sys
from engine import LLM, SamplingParams

prompts = json.loads(sys.argv[2])
params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
with LLM(sys.argv[1], dtype="float32", kv_cache_memory=1 << 22) as llm:
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
spec = {"method": "repeat_last", "num_speculative_tokens": 3}
with LLM(sys.argv[1], dtype="float32", kv_cache_memory=1 << 22, speculative_config=spec) as llm:
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    counts = llm.llm_engine.spec_decoding_stats
print(json.dumps({"equal": got == plain, "drafted": counts.num_draft_tokens,
                  "accepted": counts.num_accepted_tokens}))
"""


@pytest.fixture(scope="module")
def installed_proposer(tmp_path_factory) -> Path:
    """The example proposer package pip-installed (real entry points) into a folder."""
    target = tmp_path_factory.mktemp("repeat-proposer-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


@pytest.mark.slow
def test_third_party_proposer_loads_through_the_registry(installed_proposer, llama_dir,
                                                          tmp_path):
    env = subprocess_env(PYTHONPATH=str(installed_proposer), OMP_NUM_THREADS="1")
    listing = subprocess.run([sys.executable, "-m", "engine", "plugins", "list"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:3] == ["spec_proposer", "repeat_last", "entry-point"]
               for line in listing.stdout.splitlines()), listing.stdout
    script = tmp_path / "engine_side.py"
    script.write_text(ENGINE_SIDE)
    proc = subprocess.run(
        [sys.executable, str(script), str(llama_dir), json.dumps(_prompts([12, 30], seed=8))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["equal"] and report["accepted"] > 0, report


# ------------------------------------------------------------------ metrics


def test_spec_decode_metrics_in_prometheus_and_the_log_line(llama_dir, caplog):
    from prometheus_client import generate_latest

    prompts = _prompts([20, 35], seed=9)
    with LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB, log_stats=True,
             speculative_config=NGRAM) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        text = generate_latest(llm.llm_engine.stat_loggers.prometheus_registry).decode()
        totals = llm.llm_engine.spec_decoding_stats
        with caplog.at_level(logging.INFO, logger="engine.metrics"):
            llm.llm_engine.stat_loggers.log()

    def value(metric: str, label: str = "") -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(metric + "{") and label in ln]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert totals.num_accepted_tokens > 0
    assert value("engine_spec_decode_num_drafts_total") == totals.num_drafts
    assert value("engine_spec_decode_num_draft_tokens_total") == totals.num_draft_tokens
    assert value("engine_spec_decode_num_accepted_tokens_total") == totals.num_accepted_tokens
    for position, n in enumerate(totals.accepted_per_position):
        assert value("engine_spec_decode_num_accepted_tokens_per_pos_total",
                     f'position="{position}"') == n
    assert value("engine_spec_decode_num_accepted_tokens_per_pos_total") == (
        totals.num_accepted_tokens)
    # every generated token is counted once, kept drafts included
    assert value("engine_generation_tokens_total") == sum(len(o.outputs[0].token_ids)
                                                          for o in outs)
    line = next(r.getMessage() for r in caplog.records if "Spec decode" in r.getMessage())
    rate = 100 * totals.num_accepted_tokens / totals.num_draft_tokens
    assert f"{totals.num_draft_tokens} drafted, {totals.num_accepted_tokens} accepted" in line
    assert f"acceptance rate {rate:.1f}%" in line


# ------------------------------------------------------------------ CLI and server


@pytest.mark.slow
def test_generate_cli_with_speculative_config_equals_plain(llama_dir, plain):
    prompt = "x = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2"
    expected = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24,
                                                       ignore_eos=True))[0].outputs[0]
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(llama_dir), "--dtype",
         "float32", "--prompt", prompt, "--temperature", "0", "--max-tokens", "24",
         "--ignore-eos", "--json", "--speculative-config", json.dumps(NGRAM)],
        capture_output=True, text=True, timeout=120, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["token_ids"] == expected.token_ids
    bad = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(llama_dir), "--prompt", "x",
         "--speculative-config", '{"method": "ngram"}'],
        capture_output=True, text=True, timeout=120, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert bad.returncode == 1 and "num_speculative_tokens" in bad.stderr


@pytest.mark.slow
def test_serve_with_speculative_config_answers_and_counts_drafts(llama_dir, plain, tmp_path):
    import httpx
    import openai
    from test_serve import Server

    prompt = "x = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2"
    expected = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24,
                                                       ignore_eos=True))[0].outputs[0]
    server = Server(["--model", str(llama_dir), "--dtype", "float32", "--served-model-name",
                     "tiny", "--speculative-config", json.dumps(NGRAM)],
                    tmp_path / "config", tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    drafted = [ln for ln in metrics.splitlines()
               if ln.startswith("engine_spec_decode_num_draft_tokens_total{")]
    assert drafted and float(drafted[0].rsplit(" ", 1)[1]) > 0, metrics[-2000:]


# ------------------------------------------------------------------ scheduler bookkeeping


def test_refused_drafts_give_their_blocks_back_and_never_reach_the_prefix_cache():
    from engine.config import CacheConfig, SchedulerConfig
    from engine.core import Scheduler, Sequence
    from engine.step import DraftTokenIds, ModelRunnerOutput

    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), CacheConfig(block_size=4),
                      num_blocks=16, max_model_len=64)
    sched.num_speculative_tokens = 6
    seq = Sequence("r", [10, 11, 12, 13, 14, 15], max_tokens=20)  # 6 prompt tokens
    sched.add_sequence(seq)
    out = sched.schedule()  # the prefill
    sched.update_from_output(out, ModelRunnerOutput([seq.seq_id], [16]))
    assert len(seq.block_table) == 2
    sched.update_draft_token_ids(DraftTokenIds([seq.seq_id], [[17, 18, 19, 20, 21, 22]]))
    out = sched.schedule()
    (item,) = out.scheduled
    assert item.token_ids == [16, 17, 18, 19, 20, 21, 22] and item.num_draft_tokens == 6
    assert out.num_batched_tokens == 7
    assert len(seq.block_table) == 4  # slots for positions 6..12
    free_before = sched.kv_cache.num_free_blocks
    # the target keeps the first draft, refuses the second and samples 30 instead
    sched.update_from_output(out, ModelRunnerOutput([seq.seq_id], [30],
                                                    accepted_token_ids=[[17]]))
    assert seq.token_ids == [10, 11, 12, 13, 14, 15, 16, 17, 30]
    assert seq.num_computed_tokens == 8  # up to 17; 30 is computed by the next step
    # 9 tokens need 3 blocks: the 4th, reserved for refused drafts only, is free again
    assert len(seq.block_table) == 3
    assert sched.kv_cache.num_free_blocks == free_before + 1
    # only blocks whose every token is computed and kept are in the prefix cache
    cached = {key[1] for key in sched.kv_cache.cached_blocks}
    assert cached == {(10, 11, 12, 13), (14, 15, 16, 17)}
    counts = sched.spec_stats
    assert (counts.num_draft_tokens, counts.num_accepted_tokens) == (6, 1)
    assert counts.accepted_per_position == [1, 0, 0, 0, 0, 0]


def test_draft_length_adapts_to_how_drafts_fare():
    """Refusals halve the drafts a sequence may verify next, down to one and then
    to waiting steps without drafts; kept drafts double the length back up to
    num_speculative_tokens; a partial refusal keeps it."""
    from engine.config import CacheConfig, SchedulerConfig
    from engine.core import Scheduler, Sequence
    from engine.step import DraftTokenIds, ModelRunnerOutput

    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), CacheConfig(block_size=4),
                      num_blocks=64, max_model_len=200)
    sched.num_speculative_tokens = 8
    seq = Sequence("r", [10, 11, 12], max_tokens=150)
    sched.add_sequence(seq)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput([seq.seq_id], [5]))

    def step(num_kept: int) -> int:
        """One step with 8 proposed drafts of which the first `num_kept` are kept;
        returns how many drafts it verified."""
        sched.update_draft_token_ids(DraftTokenIds([seq.seq_id], [[7] * 8]))
        out = sched.schedule()
        (item,) = out.scheduled
        n = item.num_draft_tokens
        kept = [7] * min(num_kept, n)
        sched.update_from_output(out, ModelRunnerOutput([seq.seq_id], [9],
                                                        accepted_token_ids=[kept]))
        return n

    # all refused: 8, 4, 2, 1, then a wait of 1 step, 1, a wait of 2 steps, 1
    assert [step(0) for _ in range(9)] == [8, 4, 2, 1, 0, 1, 0, 0, 1]
    # the wait (now 4 steps) runs out, then kept drafts double the length back to 8
    assert [step(8) for _ in range(8)] == [0, 0, 0, 0, 1, 2, 4, 8]
    # a partial refusal keeps the length; a later full one halves it
    assert [step(3) for _ in range(2)] + [step(0), step(0)] == [8, 8, 8, 4]
def test_drafts_never_run_past_max_tokens():
    from engine.config import CacheConfig, SchedulerConfig
    from engine.core import Scheduler, Sequence
    from engine.step import DraftTokenIds, ModelRunnerOutput

    sched = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), num_blocks=16,
                      max_model_len=64)
    sched.num_speculative_tokens = 8
    seq = Sequence("r", [10, 11, 12], max_tokens=4)
    sched.add_sequence(seq)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput([seq.seq_id], [13]))
    sched.update_draft_token_ids(DraftTokenIds([seq.seq_id], [[1, 2, 3, 4, 5, 6, 7, 8]]))
    # one token out, three to go: two drafts and the token after them
    assert sched.schedule().scheduled[0].num_draft_tokens == 2
