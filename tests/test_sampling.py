"""Sampler: greedy, temperature, top-k/top-p/min-p, penalties, min_tokens,
seeds and logprobs, checked on real torch tensors with fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sample import Sampler, SamplerOutput, SamplingState
from engine.sampling_params import SamplingParams


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


def states_for(params: SamplingParams, count: int, prompt=(5, 6, 7), **kw) -> list[SamplingState]:
    return [SamplingState.create(params, list(prompt), i, **kw) for i in range(count)]


def draw(probs: list[float], params: SamplingParams, count: int = 4000) -> torch.Tensor:
    """`count` independent samples from one distribution (one row per sample)."""
    logits = torch.tensor(probs).log().expand(count, -1).contiguous()
    return torch.tensor(Sampler()(logits, states_for(params, count)).token_ids)


def frequencies(tokens: torch.Tensor, vocab: int) -> list[float]:
    return (torch.bincount(tokens, minlength=vocab).float() / len(tokens)).tolist()


PROBS = [0.5, 0.3, 0.15, 0.05]


# ------------------------------------------------------------------ greedy


def test_greedy_is_argmax_and_leaves_logits_untouched():
    logits = torch.randn(8, 100)
    before = logits.clone()
    out = Sampler()(logits, states_for(SamplingParams(temperature=0), 8))
    assert isinstance(out, SamplerOutput) and out.logprobs is None
    assert out.token_ids == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 500)
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_p=0.9)
    states = [SamplingState.create(greedy if i % 2 == 0 else hot, [1]) for i in range(6)]
    tokens = Sampler()(logits, states).token_ids
    assert [tokens[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


def test_half_precision_logits_sample_as_their_float32_values():
    logits = torch.randn(16, 64).to(torch.bfloat16)
    params = SamplingParams(temperature=0.8, top_k=4, seed=11, logprobs=2)
    half = Sampler()(logits, states_for(params, 16))
    full = Sampler()(logits.float(), states_for(params, 16))
    assert half.token_ids == full.token_ids
    assert half.logprobs == full.logprobs
    top4 = logits.float().topk(4, dim=-1).indices
    assert (top4 == torch.tensor(half.token_ids).unsqueeze(1)).any(dim=1).all()


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match 2 sampling states"):
        Sampler()(torch.randn(3, 10), states_for(SamplingParams(), 2))


def test_empty_batch():
    assert Sampler()(torch.empty(0, 10), []).token_ids == []


# ------------------------------------------------------------ distributions


def test_temperature_one_samples_the_softmax():
    freq = frequencies(draw(PROBS, SamplingParams(temperature=1.0)), 4)
    for got, want in zip(freq, PROBS, strict=True):
        assert abs(got - want) < 0.03


def test_sampling_is_exact_across_vocab_chunks():
    # heavy tokens in the first chunk, a middle chunk and the short last chunk
    vocab = 1000
    probs = torch.full((vocab,), 1e-9)
    probs[[3, 600, 999]] = torch.tensor([0.2, 0.3, 0.5])
    freq = frequencies(draw(probs.tolist(), SamplingParams()), vocab)
    assert abs(freq[3] - 0.2) < 0.03 and abs(freq[600] - 0.3) < 0.03
    assert abs(freq[999] - 0.5) < 0.03


def test_low_temperature_sharpens():
    cold = frequencies(draw(PROBS, SamplingParams(temperature=0.2)), 4)
    assert cold[0] > 0.9


def test_top_k_never_samples_outside_the_top_k():
    logits = torch.randn(2000, 300)
    states = states_for(SamplingParams(temperature=2.0, top_k=5), 2000)
    tokens = torch.tensor(Sampler()(logits, states).token_ids)
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == tokens.unsqueeze(1)).any(dim=1).all()


def test_large_top_k_goes_through_the_sorted_path():
    logits = torch.randn(500, 2000)
    states = states_for(SamplingParams(top_k=400), 500)
    tokens = torch.tensor(Sampler()(logits, states).token_ids)
    top = logits.topk(400, dim=-1).indices
    assert (top == tokens.unsqueeze(1)).any(dim=1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    freq = frequencies(draw(PROBS, SamplingParams(top_p=0.75)), 4)
    assert freq[2] == freq[3] == 0.0  # 0.5 + 0.3 already covers 0.75
    assert abs(freq[0] - 0.5 / 0.8) < 0.03
    freq = frequencies(draw(PROBS, SamplingParams(top_p=0.85)), 4)
    assert freq[2] > 0 and freq[3] == 0.0


def test_top_p_is_measured_after_top_k():
    # top-2 renormalised is (0.625, 0.375): p=0.6 keeps only the first
    tokens = draw(PROBS, SamplingParams(top_k=2, top_p=0.6))
    assert set(tokens.tolist()) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    freq = frequencies(draw(PROBS, SamplingParams(min_p=0.2)), 4)  # keep p >= 0.1
    assert freq[3] == 0.0 and freq[2] > 0.0


# ------------------------------------------------------------------- penalties


def _processed_logprobs(logits, params, prompt, output):
    """Log-probs the sampler reports for a greedy row: log_softmax of the
    penalized logits."""
    state = SamplingState.create(params, prompt, output_token_ids=list(output))
    out = Sampler()(logits.unsqueeze(0), [state])
    table = out.logprobs[0]
    return torch.tensor([table[i] for i in range(len(logits))])


def test_penalties_change_exactly_the_expected_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    prompt, output = [0, 1], [2, 2, 3]
    params = SamplingParams(temperature=0, logprobs=6, repetition_penalty=2.0,
                            presence_penalty=0.5, frequency_penalty=0.25)
    expected = logits.clone()
    for t in (0, 1, 2, 3):  # repetition: prompt and output
        expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
    for t, count in ((2, 2), (3, 1)):  # presence and frequency: output only
        expected[t] -= 0.5 + 0.25 * count
    got = _processed_logprobs(logits, params, prompt, output)
    assert torch.allclose(got, expected.log_softmax(-1), atol=1e-6)


def test_neutral_penalties_change_nothing():
    logits = torch.randn(50)
    got = _processed_logprobs(logits, SamplingParams(temperature=0, logprobs=50), [1, 2], [3])
    assert torch.allclose(got, logits.log_softmax(-1), atol=1e-6)


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    state = SamplingState.create(SamplingParams(temperature=0, repetition_penalty=2.0), [0])
    assert Sampler()(logits, [state]).token_ids == [1]


def test_penalized_rows_do_not_leak_into_other_rows():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    states = [SamplingState.create(SamplingParams(temperature=0, repetition_penalty=3.0), [0]),
              SamplingState.create(SamplingParams(temperature=0), [0])]
    assert Sampler()(logits, states).token_ids == [1, 0]


# ------------------------------------------------------------------ min_tokens


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0]])  # eos=1 and stop id 2 lead
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    state = SamplingState.create(params, [0], eos_token_ids={1})
    sampler = Sampler()
    assert sampler(logits, [state]).token_ids == [3]
    state.output_token_ids.extend([3, 3])
    assert sampler(logits, [state]).token_ids == [1]


def test_min_tokens_leaves_eos_alone_with_ignore_eos():
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    state = SamplingState.create(params, [0], eos_token_ids={1})
    assert Sampler()(logits, [state]).token_ids == [1]


# ----------------------------------------------------------------------- seeds


def _run_seeded(batch_before: int, batch_after: int, steps: int = 12) -> list[int]:
    """Tokens of one seeded request, surrounded by unseeded neighbours."""
    gen = torch.Generator().manual_seed(123)
    logit_steps = [torch.randn(40, 257, generator=gen) for _ in range(steps)]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    others = SamplingParams(temperature=1.3, top_k=20)
    target = SamplingState.create(params, [1, 2])
    before = [SamplingState.create(others, [3]) for _ in range(batch_before)]
    after = [SamplingState.create(others, [4]) for _ in range(batch_after)]
    sampler = Sampler()
    torch.manual_seed(batch_before * 31 + batch_after)  # neighbours draw differently
    tokens = []
    for logits in logit_steps:
        rows = torch.cat([torch.randn(batch_before, 257), logits[:1], torch.randn(batch_after, 257)])
        out = sampler(rows, before + [target] + after)
        token = out.token_ids[batch_before]
        target.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seeded_request_is_reproducible_whatever_the_batch():
    alone = _run_seeded(0, 0)
    assert _run_seeded(0, 0) == alone
    assert _run_seeded(5, 2) == alone
    assert _run_seeded(30, 9) == alone


def test_different_seeds_and_seed_offsets_differ():
    logits = torch.zeros(1, 10_000)  # uniform: collisions are unlikely

    def tokens(seed: int, offset: int) -> list[int]:
        state = SamplingState.create(SamplingParams(seed=seed), [1], offset)
        return [Sampler()(logits, [state]).token_ids[0] for _ in range(5)]

    assert tokens(1, 0) == tokens(1, 0)
    assert tokens(1, 0) != tokens(2, 0)
    assert tokens(1, 0) != tokens(1, 1)


def test_greedy_requests_get_no_generator():
    assert SamplingState.create(SamplingParams(temperature=0, seed=3), [1]).generator is None


# -------------------------------------------------------------------- logprobs


def test_logprobs_hold_the_top_n_and_the_sampled_token():
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=1.0, logprobs=3, seed=0)
    out = Sampler()(logits, states_for(params, 4))
    reference = logits.log_softmax(-1)
    for row, token, table in zip(range(4), out.token_ids, out.logprobs, strict=True):
        top3 = reference[row].topk(3).indices.tolist()
        assert set(top3) <= set(table) and token in table
        assert len(table) in (3, 4)
        for tid, value in table.items():
            assert math.isclose(value, reference[row, tid].item(), abs_tol=1e-5)


def test_logprobs_are_of_the_truncated_distribution():
    params = SamplingParams(top_k=2, logprobs=4)
    logits = torch.tensor(PROBS).log().unsqueeze(0)
    table = Sampler()(logits, [SamplingState.create(params, [0])]).logprobs[0]
    assert math.isclose(table[0], math.log(0.5 / 0.8), abs_tol=1e-5)
    assert table[2] == table[3] == -math.inf


def test_logprobs_zero_gives_only_the_sampled_token_and_others_get_none():
    logits = torch.randn(2, 30)
    states = [SamplingState.create(SamplingParams(temperature=0, logprobs=0), [1]),
              SamplingState.create(SamplingParams(temperature=0), [1])]
    out = Sampler()(logits, states)
    assert list(out.logprobs[0]) == [out.token_ids[0]] and out.logprobs[1] is None


def test_sampler_under_inference_mode_draws_what_it_draws_outside():
    logits = torch.randn(3, 2000)
    params = SamplingParams(top_p=0.5, logprobs=1, seed=5)
    outside = Sampler()(logits, states_for(params, 3))
    with torch.inference_mode():
        inside = Sampler()(logits, states_for(params, 3))
    assert inside.token_ids == outside.token_ids
    assert inside.logprobs == outside.logprobs
