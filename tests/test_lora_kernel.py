"""The batched LoRA kernel (engine_kernels::lora_add, engine/kernels/lora.cpp) on
every path this CPU runs: AVX512-BF16 (bfloat16) and AVX-512F (float32) where the
CPU has them, and the portable vector-extension code (the op's `portable`
argument, or ``ENGINE_KERNEL_PATH=portable`` through `LayerSlots`) everywhere.

The reference is the same product in float64 from the same (already rounded)
inputs. Tolerances: float32 atol 1e-4 / rtol 1e-5 (summation order only);
bfloat16 atol 2e-2 / rtol 8e-3, i.e. the one rounding of each output element to
bfloat16 (8 bits of mantissa: relative 2**-8 = 0.0039) plus the float32
accumulation, for outputs of magnitude ~1-10. Rows of the base model (slot -1)
and columns outside every part are left bit for bit as they were.
"""

from __future__ import annotations

import pytest
import torch

import engine.kernels as kernels
from engine.lora.layers import LayerSlots, PartWeights, StepBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=8e-3)}


def _cpu_flags() -> set[str]:
    return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())


def test_native_path_follows_the_cpu_flags(compiled):
    flags = _cpu_flags()
    assert torch.ops.engine_kernels.lora_add_path(torch.bfloat16) == (
        "avx512_bf16" if "avx512_bf16" in flags else "portable")
    assert torch.ops.engine_kernels.lora_add_path(torch.float32) == (
        "avx512" if "avx512f" in flags else "portable")


def _problem(dtype, rows, k, spans, max_rank, seed):
    """Random slots (4), parts with ranks 0..max_rank, rows over every slot and the base."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, parts, n = 4, len(spans), spans[-1][1] + 3  # 3 columns outside every part
    x = torch.randn(rows, k, generator=gen).to(dtype)
    a = torch.randn(num_slots, parts * max_rank, k, generator=gen).to(dtype) * 0.1
    b = torch.randn(num_slots, max_rank, n, generator=gen).to(dtype) * 0.1
    ranks = torch.randint(0, max_rank + 1, (num_slots, parts), generator=gen, dtype=torch.int32)
    ranks[0, 0] = max_rank  # the largest rank, and a part an adapter leaves alone
    ranks[1, 0] = 0
    slots = torch.randint(-1, num_slots, (rows,), generator=gen, dtype=torch.int32)
    slots[0] = -1
    out = torch.randn(rows, n, generator=gen).to(dtype)
    return x, a, b, ranks, torch.tensor(spans, dtype=torch.int32), slots, out


def _reference(x, a, b, ranks, spans, slots, out):
    ref = out.double().clone()
    max_rank = b.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for p, (c0, c1) in enumerate(spans.tolist()):
            r = int(ranks[s, p])
            h = a[s, p * max_rank:p * max_rank + r].double() @ x[t].double()
            ref[t, c0:c1] += h @ b[s, :r, c0:c1].double()
    return ref


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize(("dtype", "b_dtype"), [(torch.float32, torch.float32),
                                                (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize(("rows", "k", "spans", "max_rank"), [
    (1, 64, [(0, 64)], 16),                       # one row, one part
    (9, 70, [(0, 33), (33, 50), (50, 67)], 5),    # q/k/v-like parts, tails in K and N
    (40, 576, [(0, 96), (96, 200)], 16),          # gate/up-like, a prefill's row count
    (3, 16, [(0, 16)], 1),                        # rank 1, K of one vector
    (77, 100, [(0, 130)], 7),                     # tiles of 1-4 rows of a slot, 64+64+2 columns
])
def test_lora_add_matches_float64(compiled, portable, dtype, b_dtype, rows, k, spans,
                                  max_rank):
    x, a, b, ranks, spans_t, slots, out = _problem(dtype, rows, k, spans, max_rank, rows * k)
    b = b.to(b_dtype)  # a bfloat16 layer's B may be kept in float32
    before = out.clone()
    ref = _reference(x, a, b, ranks, spans_t, slots, out)
    torch.ops.engine_kernels.lora_add(out, x, a, b, ranks, spans_t, slots, portable)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    base = slots < 0
    assert torch.equal(out[base], before[base])  # base-model rows: untouched
    assert torch.equal(out[:, spans[-1][1]:], before[:, spans[-1][1]:])  # outside every part
    left_alone = (slots == 1).nonzero().flatten()  # slot 1's part 0 has rank 0
    c0, c1 = spans[0]
    assert torch.equal(out[left_alone, c0:c1], before[left_alone, c0:c1])


def test_lora_add_rejects_bad_arguments(compiled):
    x, a, b, ranks, spans, slots, out = _problem(torch.float32, 4, 32, [(0, 16)], 4, 0)
    op = torch.ops.engine_kernels.lora_add
    with pytest.raises(RuntimeError, match="slots must lie in"):
        op(out, x, a, b, ranks, spans, torch.full((4,), 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="ranks must lie in"):
        op(out, x, a, b, torch.full_like(ranks, 5), spans, slots)
    with pytest.raises(RuntimeError, match="spans must lie in"):
        op(out, x, a, b, ranks, torch.tensor([[0, 99]], dtype=torch.int32), slots)
    with pytest.raises(RuntimeError, match="slots must be a contiguous int32"):
        op(out, x, a, b, ranks, spans, slots.long())
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(out, x, a.bfloat16(), b, ranks, spans, slots)
    with pytest.raises(RuntimeError, match="b that one or float32"):
        op(out.bfloat16(), x.bfloat16(), a.bfloat16(), b.double(), ranks, spans, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_slots_kernel_paths_equal_plain_pytorch(compiled, monkeypatch, dtype):
    """`LayerSlots.apply` through the kernel (native path, then forced portable with
    ENGINE_KERNEL_PATH) against its plain-PyTorch path (kernels off), slots written
    from adapters' parts as the manager writes them."""
    gen = torch.Generator().manual_seed(7)
    k, spans, max_rank = 48, [(0, 40), (40, 56), (56, 72)], 8
    layer = LayerSlots(3, len(spans), max_rank, k, 72, torch.device("cpu"), dtype)
    for slot, ranks in enumerate([(8, 0, 3), (2, 5, 8), (1, 1, 1)]):
        layer.write(slot, [PartWeights(p, torch.randn(r, k, generator=gen) * 0.1,
                                       torch.randn(r, c1 - c0, generator=gen) * 0.1, (c0, c1))
                           for p, (r, (c0, c1)) in enumerate(zip(ranks, spans, strict=True))
                           if r])
    layer.write(2, [])  # emptied again: its rows must get no delta
    rows = [0, 0, -1, 1, 2, 0, 1, 1, -1, 2]
    step = StepBatch()
    step.set(torch.tensor(rows, dtype=torch.int32),
             [(s, torch.tensor([t for t, r in enumerate(rows) if r == s])) for s in (0, 1, 2)])
    x = torch.randn(len(rows), k, generator=gen).to(dtype)
    base = torch.randn(len(rows), 72, generator=gen).to(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        native = layer.apply(x, base.clone(), step)
    ops = {event.name for event in prof.events()}
    assert "engine_kernels::lora_add" in ops and "aten::mm" not in ops, ops  # the kernel ran
    monkeypatch.setenv(kernels.PATH_ENV, "portable")
    portable = layer.apply(x, base.clone(), step)
    monkeypatch.setattr(kernels, "_loaded", False)
    plain = layer.apply(x, base.clone(), step)
    assert not torch.equal(plain, base)
    torch.testing.assert_close(native, plain, **TOL[dtype])
    torch.testing.assert_close(portable, plain, **TOL[dtype])
    emptied = [t for t, r in enumerate(rows) if r in (-1, 2)]
    assert torch.equal(native[emptied], base[emptied])
