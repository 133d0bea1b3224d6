"""TORCH_SDPA's decode path: sequences cut into buckets by context length."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from attention_steps import random_attention_step

from engine.attention.backends import torch_sdpa
from engine.attention.backends.naive import NaiveAttentionImpl
from engine.attention.backends.torch_sdpa import TorchSDPAImpl, split_by_length


@pytest.fixture(autouse=True)
def _bucket_path(monkeypatch):
    """These tests check the bucket path: keep the compiled decode kernel out."""
    monkeypatch.setattr(torch_sdpa, "_use_kernel", lambda kv_cache: False)


def _cost(lengths, ends, per_bucket):
    starts = [0, *ends[:-1]]
    return sum((e - s) * lengths[e - 1] + per_bucket for s, e in zip(starts, ends, strict=True))


def _brute_force(lengths, per_bucket):
    n = len(lengths)
    return min(
        _cost(lengths, [*cuts, n], per_bucket)
        for k in range(n)
        for cuts in itertools.combinations(range(1, n), k)
    )


def test_split_by_length_keeps_equal_lengths_together_and_ends_at_the_last():
    assert split_by_length([5, 5, 5], 0) == [3]
    assert split_by_length([1, 2, 2, 9], 0) == [1, 3, 4]
    assert split_by_length([1, 2, 2, 9], 1000) == [4]


@pytest.mark.parametrize("seed", range(20))
def test_split_by_length_is_optimal(seed):
    rng = random.Random(seed)
    lengths = sorted(rng.randint(1, 40) for _ in range(rng.randint(1, 9)))
    per_bucket = rng.choice([0, 3, 10, 50])
    ends = split_by_length(lengths, per_bucket)
    assert ends[-1] == len(lengths) and ends == sorted(set(ends))
    assert _cost(lengths, ends, per_bucket) == _brute_force(lengths, per_bucket)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_decode_in_several_buckets_matches_naive(monkeypatch, kv_heads):
    monkeypatch.setattr(torch_sdpa, "BUCKET_COST_BYTES", 64)  # cut at every length
    seq_lens = [37, 2, 15, 15, 60, 1, 9, 33]
    query_lens = [1, 1, 1, 1, 6, 1, 9, 1]  # a chunk after cached context, a fresh prompt
    md, cache, (q, k, v) = random_attention_step(query_lens, seq_lens, kv_heads=kv_heads)
    sdpa = TorchSDPAImpl(4, 8, 0.3, kv_heads)
    out = sdpa.forward(None, q, k, v, cache.clone(), md)
    assert len(md.backend_state["TORCH_SDPA"].decode) > 3
    ref = NaiveAttentionImpl(4, 8, 0.3, kv_heads).forward(None, q, k, v, cache.clone(), md)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the second layer of a step reuses the plan and its gather buffer
    torch.testing.assert_close(sdpa.forward(None, q, k, v, cache.clone(), md), ref,
                               atol=1e-5, rtol=1e-5)


def test_all_decode_step_in_one_bucket_matches_naive():
    seq_lens = [3, 17, 16, 1, 8]
    md, cache, (q, k, v) = random_attention_step([1] * 5, seq_lens, seed=3)
    out = TorchSDPAImpl(4, 8, 0.3, 2).forward(None, q, k, v, cache.clone(), md)
    assert len(md.backend_state["TORCH_SDPA"].decode) == 1
    ref = NaiveAttentionImpl(4, 8, 0.3, 2).forward(None, q, k, v, cache.clone(), md)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
