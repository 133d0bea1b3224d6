"""The compiled paged prefill attention (engine_kernels::paged_prefill_attention)
against the naive backend: whole prompts, prompt chunks and prefix-cache hits
(query rows that are the last of a longer cached context), decode rows beside
them, grouped-query heads, block sizes that do and do not divide the 16-key
chunks, float32 and bfloat16. The kernel's vector-extension path runs on every
CPU; its bfloat16 AMX path (tiles for Q.K^T and P.V) where the CPU has AMX, and it
is the one bfloat16 prefills take there."""

from __future__ import annotations

import pytest
import torch
from attention_steps import random_attention_step

from engine.attention.backend import write_kv_cache
from engine.attention.backends import torch_sdpa
from engine.attention.backends.naive import NaiveAttentionImpl
from engine.attention.backends.torch_sdpa import TorchSDPAImpl, prefill_on_amx
from engine.kernels import PATH_ENV, cpu_flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads", "head_size", "block_size"),
                         [(4, 2, 16, 4), (9, 3, 64, 16), (6, 6, 32, 5), (2, 1, 80, 16)])
def test_prefill_kernel_matches_naive(compiled, monkeypatch, dtype, tol, heads, kv_heads,
                                      head_size, block_size):
    # bf16 prefills are routed to SDPA (PREFILL_KERNEL_DTYPES), and every prefill on a
    # CPU without AVX-512 (prefill_kernel_vectors_fit): here to the kernel
    monkeypatch.setattr(torch_sdpa, "PREFILL_KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    monkeypatch.setattr(torch_sdpa, "_wide_vectors", True)
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


def test_prefill_kernel_reads_strided_query_rows(compiled, monkeypatch):
    """q as the engine hands it over: a view into the fused qkv projection."""
    monkeypatch.setattr(torch_sdpa, "_wide_vectors", True)  # the kernel on any CPU
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
    """Head sizes off the 16-lane width or above 128, and bf16 off the AMX path's
    32-wide head chunks (the portable bf16 path is slower than SDPA's)."""
    md, cache, (q, k, v) = random_attention_step([5, 1], [9, 4], dtype, head_size=head_size)
    TorchSDPAImpl(4, head_size, 0.3, 2).forward(None, q, k, v, cache, md)
    plan = md.backend_state["TORCH_SDPA"]
    assert plan.kernel_prefill is None and len(plan.prefills) == 1
    assert torch_sdpa._use_kernel(cache)


def test_prefills_stay_on_sdpa_where_the_cpu_has_no_avx512(compiled, monkeypatch):
    """The kernel's 16-lane vectors are split through the stack on an AVX2 CPU
    (12x SDPA's time there): float32 prefills take it only with AVX-512, and the
    answer is the same either way."""
    monkeypatch.setattr(torch_sdpa, "_wide_vectors", None)
    assert torch_sdpa.prefill_kernel_vectors_fit() == ("avx512f" in cpu_flags())
    outs = {}
    for wide in (True, False):
        monkeypatch.setattr(torch_sdpa, "_wide_vectors", wide)
        md, cache, (q, k, v) = random_attention_step([20, 1], [30, 9], torch.float32,
                                                     block_size=16, kv_heads=2, heads=4,
                                                     head_size=16)
        outs[wide] = TorchSDPAImpl(4, 16, 0.25, 2).forward(None, q, k, v, cache, md)
        plan = md.backend_state["TORCH_SDPA"]
        assert (plan.kernel_prefill is not None) == wide and len(plan.prefills) == (not wide)
    torch.testing.assert_close(outs[True], outs[False], atol=2e-5, rtol=2e-5)


def _has_amx() -> bool:
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


# bfloat16 inputs, float32 accumulation: the probabilities are rounded to bfloat16
# before P.V on the AMX path (the vector path keeps them in float32), so both are
# held to the same bound against float32 attention over the same bf16 inputs
BF16_TOL = 2e-2


@pytest.mark.parametrize("path", ["amx", "vector"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_size", "block_size", "query_lens",
                          "seq_lens"),
                         [(9, 3, 64, 16, [40, 1, 6, 17, 2, 33], [40, 9, 37, 100, 2, 33]),
                          (4, 2, 32, 32, [256, 31], [256, 31]),
                          (8, 2, 128, 16, [64, 16], [300, 16]),
                          (2, 1, 96, 48, [70, 5], [70, 700]),
                          (4, 1, 64, 16, [40, 3], [600, 1100])])
def test_bf16_prefill_paths_match_float32_attention(compiled, path, heads, kv_heads, head_size,
                                                    block_size, query_lens, seq_lens):
    """The op itself, AMX and vector paths: whole prompts (one and several 16-token
    tiles, a partial last tile), chunks and prefix hits whose cached context spans
    several 32-key steps and cache blocks, GQA and MHA, head sizes 32-128. Where the
    CPU (or the build) has no AMX, the op answers an AMX request with its vector
    code: the same bound holds (as in the two tests below)."""
    md, cache, (q, k, v) = random_attention_step(query_lens, seq_lens, torch.bfloat16,
                                                 block_size=block_size, kv_heads=kv_heads,
                                                 heads=heads, head_size=head_size, seed=7)
    write_kv_cache(cache, k.view(-1, kv_heads, head_size), v.view(-1, kv_heads, head_size),
                   md.slot_mapping)
    seqs = [i for i, n in enumerate(query_lens) if n > 1]
    q3 = q.view(-1, heads, head_size)
    out = torch.full_like(q3, float("nan"))
    scale = head_size ** -0.5
    torch.ops.engine_kernels.paged_prefill_attention(
        out, q3, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
        torch.tensor(seqs), scale, path == "amx")
    ref = NaiveAttentionImpl(heads, head_size, scale, kv_heads).forward(
        None, q.float(), k.float(), v.float(), cache.float(), md).view_as(q3)
    starts = md.query_start_loc.tolist()
    rows = [r for i in seqs for r in range(starts[i], starts[i + 1])]
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=BF16_TOL, rtol=BF16_TOL)
    # rows of sequences not asked for are not written
    assert out[[r for r in range(len(q3)) if r not in rows]].isnan().all()


@pytest.mark.parametrize("head_size", [64, 128])
def test_amx_path_rescales_when_later_keys_score_higher(compiled, head_size):
    """Keys whose scores grow along a 700-token context: the running maximum moves
    up step after step (and across the 512-key runs whose V is interleaved at once),
    so the accumulated output is rescaled many times."""
    md, cache, (q, k, v) = random_attention_step([40], [700], torch.bfloat16, block_size=16,
                                                 kv_heads=1, heads=2, head_size=head_size)
    table = md.block_tables[0, :44]
    growth = torch.linspace(0.1, 6.0, 44 * 16).view(44, 16, 1, 1)
    cache[0, table] = (cache[0, table].float() * growth).bfloat16()
    write_kv_cache(cache, k.view(-1, 1, head_size), v.view(-1, 1, head_size), md.slot_mapping)
    q3 = q.view(-1, 2, head_size)
    out = torch.empty_like(q3)
    torch.ops.engine_kernels.paged_prefill_attention(
        out, q3, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
        torch.tensor([0]), head_size ** -0.5, True)
    ref = NaiveAttentionImpl(2, head_size, head_size ** -0.5, 1).forward(
        None, q.float(), k.float(), v.float(), cache.float(), md).view_as(q3)
    torch.testing.assert_close(out.float(), ref, atol=BF16_TOL, rtol=BF16_TOL)


def test_amx_path_ignores_stale_cache_contents(compiled):
    """Keys past the context inside its last block (a freed sequence's leftovers,
    here NaN and huge values) never reach the sums."""
    md, cache, (q, k, v) = random_attention_step([20], [20], torch.bfloat16, block_size=32,
                                                 kv_heads=1, heads=2, head_size=64)
    cache.fill_(float("nan"))
    cache[1, :, :, :, :8] = 3e38
    write_kv_cache(cache, k.view(-1, 1, 64), v.view(-1, 1, 64), md.slot_mapping)
    q3 = q.view(-1, 2, 64)
    out = torch.empty_like(q3)
    torch.ops.engine_kernels.paged_prefill_attention(
        out, q3, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
        torch.tensor([0]), 0.125, True)
    ref = NaiveAttentionImpl(2, 64, 0.125, 1).forward(None, q.float(), k.float(), v.float(),
                                                      torch.zeros(0), md)
    torch.testing.assert_close(out.float().view(20, -1), ref, atol=BF16_TOL, rtol=BF16_TOL)


def test_bf16_prefills_take_the_amx_kernel_where_the_cpu_has_it(compiled, monkeypatch):
    """Through the backend: bf16 prefills go to the kernel's AMX path on an AMX CPU
    (output equal to the naive backend's within the bound), and stay on SDPA where
    the CPU has none or ENGINE_KERNEL_PATH=portable asks for the portable code."""
    query_lens, seq_lens = [40, 1, 17], [40, 9, 100]
    md, cache, (q, k, v) = random_attention_step(query_lens, seq_lens, torch.bfloat16,
                                                 block_size=16, kv_heads=3, heads=9,
                                                 head_size=64)
    impl = TorchSDPAImpl(9, 64, 0.125, 3)
    out = impl.forward(None, q, k, v, cache.clone(), md)
    plan = md.backend_state["TORCH_SDPA"]
    assert prefill_on_amx(cache) == plan.prefill_amx == _has_amx()
    if _has_amx():
        assert plan.kernel_prefill.tolist() == [0, 2] and not plan.prefills
    else:
        assert plan.kernel_prefill is None and len(plan.prefills) == 2
    ref = NaiveAttentionImpl(9, 64, 0.125, 3).forward(None, q.float(), k.float(), v.float(),
                                                      cache.float(), md)
    torch.testing.assert_close(out.float(), ref, atol=BF16_TOL, rtol=BF16_TOL)

    monkeypatch.setenv(PATH_ENV, "portable")
    md.backend_state.clear()
    impl.forward(None, q, k, v, cache.clone(), md)
    plan = md.backend_state["TORCH_SDPA"]
    assert not plan.prefill_amx and plan.kernel_prefill is None and len(plan.prefills) == 2
    assert not prefill_on_amx(cache)
    # the float32 cache keeps the (vector) kernel, never the AMX path
    monkeypatch.delenv(PATH_ENV)
    assert not prefill_on_amx(cache.float())
