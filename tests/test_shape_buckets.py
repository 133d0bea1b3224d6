"""Prompt chunks in reduced precision run at bucketed lengths (oneDNN and torch's
bf16 CPU attention keep a kernel per shape: unbucketed, every new prompt length
grew a bf16 server's memory; benchmarks/bf16_shape_memory.py measures it), and
the padding changes no result."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.linear import AMX_MAX_ROWS, onednn_packing_supported, pack_weight, packed_linear
from engine.utils import shape_bucket


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Float32 attention of [tokens, heads, dim] q over grouped k/v: causal from
    the first key when `mask` is None, else under `mask`."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(group, 1).transpose(0, 1),
        v.float().repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask,
        is_causal=mask is None, scale=q.shape[-1] ** -0.5).transpose(0, 1)

def test_buckets_cover_every_length_with_little_padding_and_few_shapes():
    for rows in range(1, 5000):
        bucket = shape_bucket(rows)
        assert rows <= bucket <= rows + max(1, rows // 8), rows
        assert shape_bucket(bucket) == bucket
    assert len({shape_bucket(r) for r in range(AMX_MAX_ROWS + 1, 4097)}) == 56


def test_a_bucketed_bf16_prompt_chunk_matches_the_plain_product():
    torch.manual_seed(0)
    weight = torch.randn(96, 64).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    if not onednn_packing_supported(weight):
        return  # no oneDNN bf16 here: packed_linear is never called
    packed = pack_weight(weight)
    for rows in (33, 37, 100, 130):  # padded to 36, 40, 104, 136
        x = torch.randn(rows, 64).to(torch.bfloat16)
        out = packed_linear(x, packed, bias)
        assert out.shape == (rows, 96)
        expected = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.02)


def test_a_bucketed_bf16_causal_prefill_matches_the_unpadded_one():
    from engine.attention.backends.torch_sdpa import TorchSDPAImpl, _Prefill

    torch.manual_seed(0)
    heads, kv_heads, dim, length = 4, 2, 16, 37
    impl = TorchSDPAImpl(heads, dim, dim ** -0.5, kv_heads)
    q = torch.randn(length, heads, dim).to(torch.bfloat16)
    k = torch.randn(length, kv_heads, dim).to(torch.bfloat16)
    v = torch.randn(length, kv_heads, dim).to(torch.bfloat16)
    plan = _Prefill(slice(0, length), None, length, None)
    out = impl._prefill(q, k, v, torch.empty(0), plan)
    assert out.shape == (length, heads, dim)
    torch.testing.assert_close(out.float(), _reference(q, k, v, None), atol=0.03, rtol=0.03)


def test_a_bucketed_bf16_chunk_after_cached_context_matches_the_unpadded_one():
    # a chunk of 37 queries, the last of a 141-token context (a long prompt split
    # by the step budget, or a prompt after a prefix-cache hit): padded to 40 x 144
    from engine.attention.backend import causal_mask
    from engine.attention.backends.torch_sdpa import TorchSDPAImpl, _Prefill

    torch.manual_seed(0)
    heads, kv_heads, dim, length, keys = 4, 2, 16, 37, 141
    impl = TorchSDPAImpl(heads, dim, dim ** -0.5, kv_heads)
    q = torch.randn(length, heads, dim).to(torch.bfloat16)
    k = torch.randn(keys, kv_heads, dim).to(torch.bfloat16)
    v = torch.randn(keys, kv_heads, dim).to(torch.bfloat16)
    mask = causal_mask(length, keys, q.device)
    out = impl._prefill(q, k, v, torch.empty(0), _Prefill(slice(0, length), None, keys, mask))
    assert out.shape == (length, heads, dim)
    torch.testing.assert_close(out.float(), _reference(q, k, v, mask), atol=0.03, rtol=0.03)


def test_bf16_prompt_chunks_and_prefix_hits_reach_torch_attention_at_bucketed_shapes(
        make_hf_model, monkeypatch):
    from engine import LLM, SamplingParams

    shapes = set()
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):  # the real attention, shapes noted
        shapes.add((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    # a step budget of 48 tokens splits every prompt below into chunks of odd sizes
    # after odd contexts; the second round hits the prefix cache of the first
    llm = LLM(str(make_hf_model("llama")), dtype="bfloat16", kv_cache_memory=2**22,
              max_num_batched_tokens=48, max_num_seqs=4)
    try:
        prompts = [[5 + (i * 7 + j) % 900 for j in range(n)] for i, n in
                   enumerate((41, 67, 90, 113, 150))]
        params = SamplingParams(max_tokens=2, temperature=0.0)
        llm.generate(prompts, params)
        llm.generate([p + [7, 8, 9] for p in prompts], params)
    finally:
        llm.shutdown()
    prefills = {(q, k) for q, k in shapes if q > 1}
    assert any(q != k for q, k in prefills), prefills  # chunks after a context ran
    assert all(shape_bucket(q) == q and shape_bucket(k) == k for q, k in prefills), prefills
