"""SamplingParams: defaults, normalisation, and validation that names the field."""

from __future__ import annotations

import pickle

import pytest

from engine.sampling_params import SamplingParams


def test_defaults_are_neutral():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy and not p.has_penalties


def test_engine_exports_sampling_params_lazily():
    import engine

    assert engine.SamplingParams is SamplingParams


@pytest.mark.parametrize("stop, expected", [("x", ["x"]), (["a", "bc"], ["a", "bc"]),
                                            (("a",), ["a"]), (None, [])])
def test_stop_accepts_a_string_or_a_list(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_k=5).greedy
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_and_minus_one_mean_off(top_k):
    import torch

    from engine.sample import Sampler, SamplingState

    assert SamplingParams(top_k=top_k).top_k == top_k
    # off means every token keeps its softmax share, the least likely one included
    probs = [0.5, 0.3, 0.15, 0.05]
    count = 4000
    logits = torch.tensor(probs).log().expand(count, -1).contiguous()
    params = SamplingParams(top_k=top_k, seed=3)
    states = [SamplingState.create(params, [0], i) for i in range(count)]
    tokens = torch.tensor(Sampler()(logits, states).token_ids)
    freq = (torch.bincount(tokens, minlength=4).float() / count).tolist()
    for got, want in zip(freq, probs, strict=True):
        assert abs(got - want) < 0.03, freq


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("n", 0, ">= 1"),
        ("n", 1.5, "integer"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("temperature", "hot", "number"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, ">= -1"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 3.0, "[-2, 2]"),
        ("frequency_penalty", -2.5, "[-2, 2]"),
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", True, "integer"),
        ("min_tokens", -1, ">= 0"),
        ("logprobs", -1, ">= 0"),
        ("seed", "7", "integer"),
        ("stop", 5, "string"),
        ("stop", ["ok", 3], "string"),
        ("stop", [""], "empty"),
        ("stop_token_ids", [1, -2], "non-negative"),
        ("stop_token_ids", "12", "non-negative"),
        ("ignore_eos", "yes", "bool"),
        ("skip_special_tokens", 1, "bool"),
    ],
)
def test_bad_value_raises_naming_the_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert f"SamplingParams.{field}" in message
    assert allowed in message


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_max_tokens_none_means_until_the_context_is_full():
    assert SamplingParams(max_tokens=None, min_tokens=3).max_tokens is None


def test_params_pickle_round_trip():
    p = SamplingParams(temperature=0.7, stop="END", seed=3, logprobs=2)
    assert pickle.loads(pickle.dumps(p)) == p
