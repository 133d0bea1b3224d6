"""The compiled paged prefill attention (engine_kernels::paged_prefill_attention)
against the naive backend: whole prompts, prompt chunks and prefix-cache hits
(query rows that are the last of a longer cached context), decode rows beside
them, grouped-query heads, block sizes that do and do not divide the 16-key
chunks, float32 and bfloat16. The kernel has one code path (vector extensions)
on every CPU."""

from __future__ import annotations

import pytest
import torch
from attention_steps import random_attention_step

from engine.attention.backends import torch_sdpa
from engine.attention.backends.naive import NaiveAttentionImpl
from engine.attention.backends.torch_sdpa import TorchSDPAImpl

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads", "head_size", "block_size"),
                         [(4, 2, 16, 4), (9, 3, 64, 16), (6, 6, 32, 5), (2, 1, 80, 16)])
def test_prefill_kernel_matches_naive(compiled, monkeypatch, dtype, tol, heads, kv_heads,
                                      head_size, block_size):
    # bf16 prefills are routed to SDPA (PREFILL_KERNEL_DTYPES): here to the kernel
    monkeypatch.setattr(torch_sdpa, "PREFILL_KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    # whole prompts (1 of 1 ... 40 of 40: over two 16-token tiles), chunks and prefix
    # hits (6 of 37, 17 of 100), decode rows (1 of n) in between
    query_lens = [40, 1, 6, 17, 2, 1, 33, 5]
    seq_lens = [40, 9, 37, 100, 2, 60, 33, 64]
    md, cache, (q, k, v) = random_attention_step(query_lens, seq_lens, dtype,
                                                 block_size=block_size, kv_heads=kv_heads,
                                                 heads=heads, head_size=head_size, seed=heads)
    scale = head_size ** -0.5
    out = TorchSDPAImpl(heads, head_size, scale, kv_heads).forward(None, q, k, v, cache.clone(),
                                                                   md)
    plan = md.backend_state["TORCH_SDPA"]
    assert plan.kernel_prefill.tolist() == [0, 2, 3, 4, 6, 7] and not plan.prefills
    assert plan.kernel_decode.tolist() == [1, 5]
    ref = NaiveAttentionImpl(heads, head_size, scale, kv_heads).forward(
        None, q.float(), k.float(), v.float(), cache.float(), md)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_prefill_kernel_reads_strided_query_rows(compiled):
    """q as the engine hands it over: a view into the fused qkv projection."""
    md, cache, (q, k, v) = random_attention_step([20, 3], [20, 30], torch.float32,
                                                 block_size=16, kv_heads=2, heads=4,
                                                 head_size=16)
    qkv = torch.cat([q, k, v], dim=1)
    q_view, k_view, v_view = qkv.split([64, 32, 32], dim=1)
    assert not q_view.is_contiguous()
    out = TorchSDPAImpl(4, 16, 0.25, 2).forward(None, q_view, k_view, v_view, cache.clone(), md)
    ref = NaiveAttentionImpl(4, 16, 0.25, 2).forward(None, q, k, v, cache.clone(), md)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_prefill_kernel_refuses_bad_input(compiled):
    md, cache, (q, _, _) = random_attention_step([5], [9], torch.float32, block_size=4,
                                                 kv_heads=2, heads=4, head_size=16)
    q3 = q.view(-1, 4, 16)
    out = torch.empty_like(q3)
    op = torch.ops.engine_kernels.paged_prefill_attention
    with pytest.raises(RuntimeError, match="out of range"):
        op(out, q3, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
           torch.tensor([1]), 0.25)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(out, q3, cache, torch.full_like(md.block_tables, 99), md.seq_lens_tensor,
           md.query_start_loc, torch.tensor([0]), 0.25)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(out[..., :8], q3[..., :8], cache[..., :8].contiguous(), md.block_tables,
           md.seq_lens_tensor, md.query_start_loc, torch.tensor([0]), 0.25)


@pytest.mark.parametrize(("dtype", "head_size"), [(torch.float32, 8), (torch.float32, 144),
                                                 (torch.bfloat16, 16)])
def test_prefills_the_kernel_does_not_take_stay_on_sdpa(compiled, dtype, head_size):
    """Head sizes off the 16-lane width or above 128, and bf16 (slower than SDPA's)."""
    md, cache, (q, k, v) = random_attention_step([5, 1], [9, 4], dtype, head_size=head_size)
    TorchSDPAImpl(4, head_size, 0.3, 2).forward(None, q, k, v, cache, md)
    plan = md.backend_state["TORCH_SDPA"]
    assert plan.kernel_prefill is None and len(plan.prefills) == 1
    assert torch_sdpa._use_kernel(cache)
