"""`engine_kernels::paged_decode_attention` called directly against a float64
reference: softmax(scale q K^T) V over each sequence's context gathered through its
block table. Every path this CPU runs is checked: the AVX512-BF16 scoring of a
bfloat16 cache (where the CPU has it), the AVX2 task of both dtypes (a CPU with
AVX2 and no AVX-512) and the portable vector-extension code
(`portable=True`, what ENGINE_KERNEL_PATH=portable selects), at group sizes 1, 2,
3, 6, 8 and 12 (a group above 8 query heads is split into tiles), head sizes with compiled
shapes (64, 128), the run-time shape (80) and the scalar path (24), contexts
that end inside a block and span many blocks of a shuffled cache, and contexts
split between two threads."""

from __future__ import annotations

import pytest
import torch
from attention_steps import random_attention_step

import engine.kernels as kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# float32: exp_approx (~2 ulp) and float32 sums against float64;
# bfloat16: the output is rounded to bfloat16 (relative 2^-8)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def reference(q, cache, md, seqs, scale):
    """[n, H, D] float64: each listed sequence's row against its gathered context."""
    _, _, block_size, kv_heads, head_size = cache.shape
    heads = q.shape[1]
    rows = []
    for s in seqs:
        length = md.seq_lens[s]
        blocks = md.block_tables[s, : -(-length // block_size)]
        k, v = (cache[i].index_select(0, blocks).reshape(-1, kv_heads, head_size)[:length].double()
                for i in (0, 1))
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        qs = q[md.query_start_loc[s]].double()  # [H, D]
        p = torch.softmax(torch.einsum("hd,lhd->hl", qs, k) * scale, dim=-1)
        rows.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(rows)


def run_kernel(md, cache, q, seqs, scale, portable):
    out = torch.full_like(q, 7.0)  # rows the kernel must not touch keep this
    torch.ops.engine_kernels.paged_decode_attention(
        out, q, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
        torch.tensor(seqs, dtype=torch.int64), scale, portable)
    return out


def paths(dtype):
    """`portable` values that run different code here."""
    own = torch.ops.engine_kernels.paged_decode_attention_path()
    return [False, True] if dtype == torch.bfloat16 or own == "avx2" else [False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_size"),
                         [(3, 3, 64), (9, 3, 64), (8, 1, 128), (12, 2, 64), (6, 2, 80),
                          (4, 4, 128), (6, 3, 24), (12, 1, 64)])
def test_decode_kernel_matches_float64_reference(compiled, dtype, heads, kv_heads, head_size):
    seq_lens = [1, 15, 16, 17, 70, 33, 300, 2]
    md, cache, (q, _, _) = random_attention_step(
        [1] * len(seq_lens), seq_lens, dtype, block_size=16, kv_heads=kv_heads, heads=heads,
        head_size=head_size, seed=heads * head_size)
    q = q.view(-1, heads, head_size)
    seqs = [0, 1, 2, 3, 4, 6, 7]  # row 5 is not decoded: it must stay as it was
    scale = head_size**-0.5
    ref = reference(q, cache, md, seqs, scale)
    tol = TOLERANCE[dtype]
    for portable in paths(dtype):
        out = run_kernel(md, cache, q, seqs, scale, portable)
        torch.testing.assert_close(out[seqs].double(), ref, atol=tol, rtol=tol,
                                   msg=lambda m, p=portable: f"portable={p}: {m}")
        assert (out[5] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 32])
def test_decode_kernel_long_contexts_split_between_threads(compiled, dtype, block_size):
    """Too few (sequence, KV head) pairs for two threads: the contexts are cut into
    pieces (pieces that start inside a block, pieces past a short context's end)
    and merged; the result is the unsplit one's, within the same tolerance."""
    seq_lens = [1100, 40, 700]
    md, cache, (q, _, _) = random_attention_step(
        [1] * 3, seq_lens, dtype, block_size=block_size, kv_heads=1, heads=3, head_size=64,
        seed=block_size)
    q = q.view(3, 3, 64)
    ref = reference(q, cache, md, [0, 1, 2], 0.125)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for portable in paths(dtype):
            out = run_kernel(md, cache, q, [0, 1, 2], 0.125, portable)
            torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype],
                                       rtol=TOLERANCE[dtype])
    finally:
        torch.set_num_threads(before)


def test_decode_kernel_reports_the_path_the_cpu_takes(compiled):
    flags = kernels.cpu_flags()
    expected = ("avx512_bf16" if "avx512_bf16" in flags
                else "avx2" if {"avx2", "fma"} <= flags and "avx512f" not in flags
                else "portable")
    assert torch.ops.engine_kernels.paged_decode_attention_path() == expected


def test_decode_kernel_bf16_paths_agree_closely(compiled):
    """The AVX512-BF16 scores (exact bf16 products summed in float32) and the
    portable ones (widened to float32, then FMAs) differ only by float32 rounding:
    their outputs are equal or one bfloat16 step apart."""
    md, cache, (q, _, _) = random_attention_step(
        [1] * 4, [300, 64, 129, 5], torch.bfloat16, block_size=16, kv_heads=3, heads=9,
        head_size=64, seed=3)
    q = q.view(4, 9, 64)
    fast = run_kernel(md, cache, q, [0, 1, 2, 3], 0.125, False).float()
    portable = run_kernel(md, cache, q, [0, 1, 2, 3], 0.125, True).float()
    step = fast.abs().clamp_min(2**-20) * 2**-7
    assert ((fast - portable).abs() <= step).all()


def test_decode_kernel_with_no_rows_writes_nothing(compiled):
    md, cache, (q, _, _) = random_attention_step([1, 1], [5, 20], torch.float32, kv_heads=2,
                                                 heads=4, head_size=16)
    out = run_kernel(md, cache, q.view(2, 4, 16), [], 0.25, False)
    assert (out == 7.0).all()
