"""End-to-end generation against `transformers` as the oracle.

Greedy tokens must equal `transformers`' greedy `generate` token for token, for
tiny random Llama and Qwen2 models, whatever the engine does underneath: prompts
of different lengths in one batch, chunked prefill, prefix-cache hits and
preemption under a KV budget too small for every request at once.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams

MAX_TOKENS = 24
KIB = 1024


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts that avoid the special ids 0..2."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 1024) for _ in range(n)] for n in lengths]


class Oracle:
    """transformers' greedy continuation of token-id prompts, cached."""

    def __init__(self) -> None:
        self.models: dict = {}
        self.cache: dict = {}

    def greedy(self, model_dir, prompt: list[int], max_new: int = MAX_TOKENS) -> list[int]:
        key = (str(model_dir), tuple(prompt), max_new)
        if key not in self.cache:
            import transformers

            if model_dir not in self.models:
                self.models[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=torch.float32).eval()
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                out = self.models[model_dir].generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=2)
            self.cache[key] = out[0, len(prompt):].tolist()
        return self.cache[key]


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture(scope="module")
def llama_dir(make_hf_model):
    return make_hf_model("llama")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _assert_matches(llm: LLM, model_dir, prompts, oracle: Oracle, params=GREEDY):
    outputs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == oracle.greedy(model_dir, prompt), f"prompt {i}"
    return outputs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_for_prompts_of_different_lengths(
        arch, make_hf_model, oracle):
    model_dir = make_hf_model(arch)
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB)
    _assert_matches(llm, model_dir, _prompts([3, 17, 40, 95, 1]), oracle)


def test_greedy_matches_with_chunked_prefill(llama_dir, oracle):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
              max_num_batched_tokens=16)
    _assert_matches(llm, llama_dir, _prompts([70, 33, 5], seed=1), oracle)


def test_greedy_matches_with_the_naive_attention_backend(llama_dir, oracle):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=4 * 1024 * KIB,
              attention_backend="NAIVE")
    _assert_matches(llm, llama_dir, _prompts([9, 30], seed=2), oracle)


def test_repeated_prefix_skips_prefill_and_matches(llama, llama_dir, oracle):
    prefix = _prompts([40], seed=3)[0]
    first, second = prefix + [11, 12], prefix + [13, 14, 15]
    _assert_matches(llama, llama_dir, [first], oracle)
    (out,) = _assert_matches(llama, llama_dir, [second], oracle)
    assert out.num_cached_tokens == 32  # two full 16-token blocks of the shared prefix


def test_greedy_matches_under_preemption(llama_dir, oracle):
    # one block holds 16 tokens x 2 layers x K,V x 2 heads x 16 dims x 4 bytes = 8 KiB;
    # 12 blocks cannot hold four sequences of up to ~60 tokens (4 blocks each)
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=12 * 8 * KIB,
              enable_prefix_caching=False)
    prompts = _prompts([30, 28, 33, 25], seed=4)
    _assert_matches(llm, llama_dir, prompts, oracle)
    assert llm.llm_engine.num_preemptions > 0


def test_text_prompts_are_encoded_with_the_model_tokenizer(llama, llama_dir, oracle):
    text = "def fibonacci(n):\n    return"
    (out,) = llama.generate(text, GREEDY)
    assert out.prompt == text
    assert out.prompt_token_ids == llama.get_tokenizer().encode(text)
    assert out.outputs[0].token_ids == oracle.greedy(llama_dir, out.prompt_token_ids)


def test_n_samples_share_the_prompt(llama, llama_dir, oracle):
    prompt = _prompts([37], seed=5)[0]
    (out,) = llama.generate([prompt], SamplingParams(n=3, temperature=0.0,
                                                     max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    expected = oracle.greedy(llama_dir, prompt)
    assert all(c.token_ids == expected for c in out.outputs)


def test_seeded_sampling_is_reproducible_across_instances_and_batches(llama, llama_dir):
    prompt = _prompts([12], seed=6)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16,
                            seed=1234, ignore_eos=True)
    alone = llama.generate([prompt], params)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batched = llama.generate(_prompts([5, 30], seed=7) + [prompt], [other, other, params])
    assert batched[2].outputs[0].token_ids == alone
    fresh = LLM(llama_dir, dtype="float32", kv_cache_memory=1024 * KIB, seed=99)
    assert fresh.generate([prompt], params)[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16,
                                seed=4321, ignore_eos=True)
    assert llama.generate([prompt], other_seed)[0].outputs[0].token_ids != alone


def test_stop_string_cuts_the_text_exactly(llama):
    prompt = "class Stack:\n"
    full = llama.generate(prompt, SamplingParams(temperature=0.0, max_tokens=32,
                                                 ignore_eos=True))[0].outputs[0]
    text = full.text
    assert len(text) > 12
    stop = text[6:9]  # a few characters in the middle, maybe across tokens
    cut = text[: text.index(stop)]
    out = llama.generate(prompt, SamplingParams(temperature=0.0, max_tokens=32,
                                                ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == cut
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_token_id_ends_the_sequence(llama, llama_dir, oracle):
    prompt = _prompts([10], seed=8)[0]
    expected = oracle.greedy(llama_dir, prompt)
    stop_id = expected[5]
    out = llama.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                  stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids[-1] == stop_id and stop_id not in out.token_ids[:-1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_too_long_prompt_fails_alone(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=1024 * KIB, max_model_len=64)
    ok, too_long = _prompts([8, 65], seed=9)
    with pytest.raises(ValueError, match=r"prompt 1: .*65 tokens.*max_model_len=64"):
        llm.generate([ok, too_long], GREEDY)
    # the engine keeps serving, and a bad request next to running ones hurts nobody
    engine = llm.llm_engine
    request_id = engine.add_request(ok, GREEDY)
    with pytest.raises(ValueError, match="max_model_len=64"):
        engine.add_request(too_long, GREEDY)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [request_id]
    assert len(finished[0].outputs[0].token_ids) == MAX_TOKENS


def test_streaming_deltas_add_up_to_the_final_text(llama):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    snapshots = list(llama.generate_stream("import os\n", params))
    assert snapshots[-1].finished and not any(s.finished for s in snapshots[:-1])
    final = snapshots[-1].outputs[0]
    assert "".join(s.outputs[0].text_delta for s in snapshots) == final.text
    assert final.text == llama.generate("import os\n", params)[0].outputs[0].text


def test_abandoned_stream_frees_its_request(llama):
    stream = llama.generate_stream("x = ", SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llama.llm_engine.has_unfinished_requests()


def test_a_long_prompt_streams_a_snapshot_per_step_and_stops_before_its_first_token(
        llama_dir):
    """A prompt of several prompt steps (a 16-token step budget): a snapshot after
    each of them, without tokens, so the caller can stop before the first token;
    leaving the loop aborts the request. Run to the end, the deltas make the text."""
    prompt = list(range(5, 85))  # 80 tokens: five prompt steps
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with LLM(llama_dir, dtype="float32", kv_cache_memory=2 * 1024 * KIB,
             max_num_batched_tokens=16, enable_chunked_prefill=True) as llm:
        engine = llm.llm_engine
        seen = []
        for snapshot in llm.generate_stream(prompt, params):
            seen.append(snapshot)
            if len(seen) == 2:
                break
        assert [s.outputs[0].token_ids for s in seen] == [[], []]
        assert [s.outputs[0].text_delta for s in seen] == ["", ""]
        assert not any(s.finished for s in seen)
        assert not engine.has_unfinished_requests()  # leaving the loop aborted it
        fresh = list(range(100, 180))  # not the prompt above: no cached blocks
        whole = list(llm.generate_stream(fresh, params))
        assert [len(s.outputs[0].token_ids) for s in whole] == [0, 0, 0, 0, 1, 2, 3]
        assert whole[-1].finished and not any(s.finished for s in whole[:-1])
        assert "".join(s.outputs[0].text_delta for s in whole) == whole[-1].outputs[0].text
        assert whole[-1].outputs[0].token_ids == \
            llm.generate([fresh], params)[0].outputs[0].token_ids


def test_logit_bias_bans_and_forces_tokens_greedy_and_sampled(llama):
    prompt = [5, 6, 7, 8]
    plain = llama.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                    ignore_eos=True))[0].outputs[0].token_ids
    banned = llama.generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True,
        logit_bias={plain[0]: -100}))[0].outputs[0].token_ids
    assert banned[0] != plain[0]
    for temperature in (0.0, 0.9):
        out = llama.generate([prompt, prompt], SamplingParams(
            temperature=temperature, seed=2, max_tokens=5, ignore_eos=True, logprobs=1,
            logit_bias={9: 100, plain[0]: -100}))
        for o in out:
            assert o.outputs[0].token_ids == [9] * 5
            # the log-probabilities are those of the biased distribution drawn from
            assert all(lp[9] > -1e-3 for lp in o.outputs[0].logprobs)
    # a biased request beside plain ones leaves theirs as they were
    mixed = llama.generate([prompt, prompt], [
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={9: 100}),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)])
    assert [o.outputs[0].token_ids for o in mixed] == [[9] * 4, plain]
    with pytest.raises(ValueError, match=r"prompt 0: SamplingParams.logit_bias must name token "
                                         r"ids of the vocabulary"):
        llama.generate([prompt], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be a number in \[-100, 100\]"):
        SamplingParams(logit_bias={3: float("inf")})


def test_logprobs_are_passed_through(llama):
    out = llama.generate("a", SamplingParams(temperature=0.0, max_tokens=4, logprobs=2,
                                             ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, logprobs in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in logprobs and len(logprobs) >= 2
        assert max(logprobs.values()) <= 0.0


def test_bad_sampling_params_name_the_field():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_sampling_params_list_must_match_the_prompts(llama):
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        llama.generate(["a", "b", "c"], [GREEDY, GREEDY])
