"""The compiled CPU kernels (engine.kernels): the paged decode-attention op
against the naive backend, and greedy float32 generation through it against
transformers. Building the library takes a minute (once per machine: cached)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from attention_steps import random_attention_step
from conftest import onednn_packs_bf16

import engine.kernels as kernels
from engine.attention.backends import torch_sdpa
from engine.attention.backends.naive import NaiveAttentionImpl
from engine.attention.backends.torch_sdpa import TorchSDPAImpl

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_paged_decode_kernel_matches_naive(compiled, dtype, tol, kv_heads):
    seq_lens = [37, 2, 15, 15, 60, 1, 9, 33]
    query_lens = [1, 1, 1, 1, 6, 1, 9, 1]  # decode rows next to a chunk and a fresh prompt
    md, cache, (q, k, v) = random_attention_step(query_lens, seq_lens, dtype, kv_heads=kv_heads, heads=6)
    assert torch_sdpa._use_kernel(cache)
    out = TorchSDPAImpl(6, 8, 0.3, kv_heads).forward(None, q, k, v, cache.clone(), md)
    plan = md.backend_state["TORCH_SDPA"]
    assert plan.kernel_decode.tolist() == [0, 1, 2, 3, 5, 7] and not plan.decode
    ref = NaiveAttentionImpl(6, 8, 0.3, kv_heads).forward(None, q.float(), k.float(), v.float(),
                                                         cache.float(), md)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("head_size", "block_size"), [(64, 16), (128, 4), (80, 16), (24, 16)])
def test_paged_decode_kernel_vector_paths(compiled, dtype, tol, head_size, block_size):
    """Head sizes that take the 16-lane vector code (64, 128, 80) and one that takes
    the scalar path (24); contexts that end inside a block and span several."""
    seq_lens = [1, 17, 33, 200, 16, 5]
    md, cache, (q, k, v) = random_attention_step(
        [1] * len(seq_lens), seq_lens, dtype, block_size=block_size, kv_heads=3, heads=9,
        head_size=head_size, seed=head_size)
    assert torch_sdpa._use_kernel(cache)
    scale = head_size**-0.5
    out = TorchSDPAImpl(9, head_size, scale, 3).forward(None, q, k, v, cache.clone(), md)
    ref = NaiveAttentionImpl(9, head_size, scale, 3).forward(
        None, q.float(), k.float(), v.float(), cache.float(), md)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 37])  # 37: rows that end in a scalar tail
def test_fused_ops_match_forward_native(compiled, dtype, hidden):
    """The C++ RMSNorm (with and without the residual add), SiLU-and-mul and RoPE
    give `forward_native`'s result: bitwise in bfloat16 (same roundings), within
    float32 reassociation in float32."""
    from engine.kernels import usable_for
    from engine.ops import RMSNorm, RotaryEmbedding, SiluAndMul

    assert usable_for(torch.zeros(1, dtype=dtype))  # forward_cpu takes the C++ path
    gen = torch.Generator().manual_seed(hidden)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 3).to(dtype)

    def same(a, b):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)

    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data.copy_(randn(hidden))
    x, residual = randn(19, hidden), randn(19, hidden)
    same(norm.forward_cpu(x), norm.forward_native(x))
    (out, res), (ref, ref_res) = norm.forward_cpu(x, residual), norm.forward_native(x, residual)
    same(out, ref)
    assert torch.equal(res, ref_res)  # one rounding of one add either way
    assert norm.forward_cpu(x.view(1, 19, hidden)).shape == (1, 19, hidden)

    act = SiluAndMul()
    x = randn(19, 2 * hidden)
    same(act.forward_cpu(x), act.forward_native(x))

    positions = torch.randint(0, 500, (19,), generator=gen)
    for head_size, rotary_dim in ((64, 64), (64, 32), (40, 40)):
        rope = RotaryEmbedding(head_size, rotary_dim, 512, 10000.0)
        qkv = randn(19, 7 * head_size)
        q, k, _ = qkv.split([4 * head_size, 2 * head_size, head_size], dim=-1)  # strided rows
        got = rope.forward_cpu(positions, q, k)
        rope._last_cos_sin = None
        for a, b in zip(got, rope.forward_native(positions, q, k), strict=True):
            same(a, b)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "k"), [(64, 576), (37, 70), (5, 33)])  # tails in N and in K
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemv_matches_linear(compiled, n, k, with_bias):
    """The few-row bf16 linear kernel against F.linear computed in float32, for
    every row count it takes, and `packed_linear` choosing it up to GEMV_MAX_ROWS;
    on a CPU whose bf16 products are widened (no oneDNN copy), `plain_linear`
    choosing it up to WIDENED_GEMV_MAX_ROWS."""
    from engine.ops.linear import (
        GEMV_MAX_ROWS,
        WIDENED_GEMV_MAX_ROWS,
        pack_weight,
        packed_linear,
        plain_linear,
    )

    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16() if with_bias else None
    for rows in range(1, 9):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        torch.ops.engine_kernels.bf16_gemv(out, x, weight, bias)
        ref = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.engine_kernels.bf16_gemv(torch.empty(9, n, dtype=torch.bfloat16),
                                           torch.zeros(9, k, dtype=torch.bfloat16), weight, None)
    if not onednn_packs_bf16():
        x = torch.randn(WIDENED_GEMV_MAX_ROWS, k, generator=gen).bfloat16()
        direct = torch.empty(WIDENED_GEMV_MAX_ROWS, n, dtype=torch.bfloat16)
        torch.ops.engine_kernels.bf16_gemv(direct, x, weight, bias)
        assert torch.equal(plain_linear(x, weight, bias), direct)
        return
    packed = pack_weight(weight)
    x = torch.randn(GEMV_MAX_ROWS, k, generator=gen).bfloat16()
    via_kernel = packed_linear(x, packed, bias, weight)
    direct = torch.empty(GEMV_MAX_ROWS, n, dtype=torch.bfloat16)
    torch.ops.engine_kernels.bf16_gemv(direct, x, weight, bias)
    assert torch.equal(via_kernel, direct)  # the kernel's own result, not oneDNN's
    onednn = packed_linear(x, packed, bias)
    torch.testing.assert_close(via_kernel.float(), onednn.float(), atol=2e-2, rtol=1e-2)


def _cpu_has_amx() -> bool:
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    return "amx_bf16" in flags and "amx_tile" in flags


@pytest.mark.slow
@pytest.mark.parametrize(("n", "k"), [(48, 64), (960, 576), (576, 1536)])
def test_amx_linear_matches_linear(compiled, monkeypatch, n, k):
    """The AMX kernel against F.linear in float32 for 1-32 rows (one tile of rows
    and two) and prompt-sized row counts (several 32-row blocks and a tail; K of
    1,536 in several chunks), with a bias, and packed_linear routing by row count:
    GEMV up to GEMV_FIRST_ROWS, AMX up to AMX_PROMPT_MAX_ROWS (and an x of at most
    AMX_PROMPT_MAX_X_BYTES), oneDNN above and under ENGINE_KERNEL_PATH=portable."""
    from engine.ops.linear import (
        AMX_PROMPT_MAX_ROWS,
        AMX_PROMPT_MAX_X_BYTES,
        GEMV_FIRST_ROWS,
        onednn_linear,
        pack_weight,
        pack_weight_for_amx,
        packed_linear,
    )

    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    amx = pack_weight_for_amx(weight)
    assert torch.ops.engine_kernels.amx_supported() == _cpu_has_amx()
    if not _cpu_has_amx():
        assert amx is None
        return
    assert pack_weight_for_amx(weight[:, :20].contiguous()) is None  # in not a multiple of 32
    packed = pack_weight(weight)
    for rows in (1, 2, 3, 15, 16, 17, 31, 32, 33, 48, 64, 100, 300):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        torch.ops.engine_kernels.amx_linear(out, x, amx, bias)
        ref = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=1e-2)
        routed = packed_linear(x, packed, bias, weight, amx)
        if rows > GEMV_FIRST_ROWS and x.numel() * 2 <= AMX_PROMPT_MAX_X_BYTES:
            assert torch.equal(routed, out)  # the AMX kernel's own result
        elif rows > GEMV_FIRST_ROWS:  # an x too large for L2 beside the panel: oneDNN
            assert torch.equal(routed, onednn_linear(x, packed, bias))
        torch.testing.assert_close(routed.float(), ref, atol=3e-2, rtol=1e-2)
    x = torch.randn(AMX_PROMPT_MAX_ROWS + 1, k, generator=gen).bfloat16()
    assert torch.equal(packed_linear(x, packed, bias, weight, amx), onednn_linear(x, packed, bias))
    x = x[:100]
    monkeypatch.setenv(kernels.PATH_ENV, "portable")
    assert torch.equal(packed_linear(x, packed, bias, weight, amx), onednn_linear(x, packed, bias))
    with pytest.raises(RuntimeError, match="packed does not match"):
        torch.ops.engine_kernels.amx_linear(torch.empty(100, n, dtype=torch.bfloat16),
                                            x[:, :32].contiguous(), amx, None)


# amx_split_linear's stated accuracy: within this fraction of the largest |output|
# of the float64 product (each operand keeps 16 of float32's 24 significant bits
# and one of four cross terms is left out: at most ~2^-16 a product; measured 4-6e-6)
SPLIT_REL_TOL = 3e-5


@pytest.mark.parametrize(("n", "k"), [(48, 64), (960, 576), (576, 1536)])
def test_amx_split_linear_matches_float64(compiled, monkeypatch, n, k):
    """float32 products on AMX as three bfloat16 tile products (amx_split_linear)
    against the float64 product within SPLIT_REL_TOL, for one tile of rows, two,
    several 32-row blocks with a tail, and (K = 1,536) more rows than one call
    takes, which `packed_linear` slices without changing a bit; `packed_linear`
    routing: the float32 GEMV up to FP32_GEMV_FIRST_ROWS, the split kernel above,
    F.linear under ENGINE_KERNEL_PATH=portable (no oneDNN copy is kept)."""
    from engine.ops.linear import (
        FP32_GEMV_FIRST_ROWS,
        pack_weight_for_amx,
        packed_linear,
        plain_linear,
    )

    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    amx = pack_weight_for_amx(weight)
    if not _cpu_has_amx():  # float32 prompts then run oneDNN (test_fp32_kernels.py)
        assert amx is None
        return
    assert amx.dtype == torch.bfloat16 and amx.shape == (n // 16, 2 * k // 32, 16, 32)
    for rows, b in ((1, bias), (8, None), (9, bias), (32, bias), (33, bias), (100, None),
                    (300, bias)):
        x = torch.randn(rows, k, generator=gen)
        out = torch.empty(rows, n)
        torch.ops.engine_kernels.amx_split_linear(out, x, amx, b)
        want = F.linear(x.double(), weight.double(), None if b is None else b.double())
        err = (out.double() - want).abs().max().item()
        assert err <= SPLIT_REL_TOL * want.abs().max().item(), f"{rows} rows: max error {err}"
        routed = packed_linear(x, None, b, weight, amx)
        if rows > FP32_GEMV_FIRST_ROWS:
            assert torch.equal(routed, out)
        else:
            assert torch.equal(routed, plain_linear(x, weight, b))
    monkeypatch.setenv(kernels.PATH_ENV, "portable")
    assert torch.equal(packed_linear(x, None, bias, weight, amx), F.linear(x, weight, bias))
    with pytest.raises(RuntimeError, match="packed does not match"):
        torch.ops.engine_kernels.amx_split_linear(torch.empty(40, n), x[:40, :32].contiguous(),
                                                  amx, None)
    with pytest.raises(RuntimeError, match="x and out must be Float"):
        torch.ops.engine_kernels.amx_split_linear(torch.empty(40, n), x[:40].bfloat16(), amx,
                                                  None)


@pytest.mark.parametrize(("i", "k"), [(48, 64), (1536, 576)])
def test_amx_split_silu_and_mul_matches_float64(compiled, i, k):
    """The gated split kernel: silu(x G^T + g) * (x U^T + u) in float32 against
    float64, within SPLIT_REL_TOL of the largest |output|."""
    from engine.ops.linear import amx_prompt_silu_and_mul, pack_weight_for_amx

    gen = torch.Generator().manual_seed(i + k)
    weight = torch.randn(2 * i, k, generator=gen) / k**0.5
    bias = torch.randn(2 * i, generator=gen)
    amx = pack_weight_for_amx(weight)
    if not _cpu_has_amx():
        assert amx is None
        return
    for rows, b in ((5, None), (33, bias), (256, bias)):
        x = torch.randn(rows, k, generator=gen)
        out = torch.empty(rows, i)
        torch.ops.engine_kernels.amx_split_silu_and_mul(out, x, amx, b)
        gate, up = F.linear(x.double(), weight.double(),
                            None if b is None else b.double()).chunk(2, dim=-1)
        want = F.silu(gate) * up
        err = (out.double() - want).abs().max().item()
        assert err <= SPLIT_REL_TOL * want.abs().max().item(), f"{rows} rows: max error {err}"
        if rows > 32:
            assert torch.equal(amx_prompt_silu_and_mul(x, b, amx), out)


@pytest.mark.slow
@pytest.mark.parametrize(("i", "k"), [(48, 64), (1536, 576), (96, 1536)])
def test_amx_silu_and_mul_matches_projection_then_silu_and_mul(compiled, i, k):
    """The gated AMX kernel against the fused projection (F.linear, rounded to bf16)
    followed by the SiLU-and-mul kernel: the same roundings, so equal up to the
    matmul's float32 summation order (a last-bit difference where a sum lands
    near a rounding boundary)."""
    from engine.ops.linear import pack_weight_for_amx

    gen = torch.Generator().manual_seed(i + k)
    weight = (torch.randn(2 * i, k, generator=gen) / k**0.5).bfloat16()
    bias = torch.randn(2 * i, generator=gen).bfloat16()
    amx = pack_weight_for_amx(weight)
    if not _cpu_has_amx():  # the prompt path then stays on oneDNN (test_prefill_path.py)
        assert amx is None
        return
    for rows, b in ((5, None), (33, bias), (100, None), (256, bias)):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = torch.empty(rows, i, dtype=torch.bfloat16)
        torch.ops.engine_kernels.amx_silu_and_mul(out, x, amx, b)
        want = torch.empty(rows, i, dtype=torch.bfloat16)
        torch.ops.engine_kernels.silu_and_mul(want, F.linear(x, weight, b))
        ulp = want.float().abs() * 2.0**-7 + 1e-30
        off = (out.float() - want.float()).abs() > ulp
        assert off.float().mean().item() < 1e-3, f"{off.sum().item()} values off by > 1 ulp"
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.engine_kernels.amx_silu_and_mul(torch.empty(5, i, dtype=torch.bfloat16),
                                                  x[:5].contiguous(), amx, bias[:i])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_kernel_matches_index_copy(compiled, dtype):
    """The compiled cache write puts every row where the two index_copy_ calls do,
    from strided views of a fused qkv tensor, and refuses a slot outside the cache."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 6, 4, 3, 8, generator=gen).to(dtype)
    qkv = torch.randn(5, (6 + 3 + 3) * 8, generator=gen).to(dtype)
    k = qkv[:, 48:72].view(5, 3, 8)
    v = qkv[:, 72:].view(5, 3, 8)
    slots = torch.tensor([23, 0, 7, 12, 5])
    expected = cache.clone()
    expected[0].view(-1, 3, 8).index_copy_(0, slots, k)
    expected[1].view(-1, 3, 8).index_copy_(0, slots, v)
    torch.ops.engine_kernels.write_kv_cache(cache, k, v, slots)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.engine_kernels.write_kv_cache(cache, k, v, torch.tensor([0, 1, 2, 3, 24]))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch(compiled, dtype):
    """Ties give the first index, NaN counts as the largest (its first position),
    rows of -inf give 0, short rows take the scalar tail only."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1000, generator=gen)
    x[1, 10] = x[1, 900] = 99.0
    x[2, 500] = x[2, 20] = float("nan")
    x[3] = -float("inf")
    x[4, 999] = 99.0  # in the last, partial, vector
    for t in (x.to(dtype), x[:, :7].contiguous().to(dtype)):
        got = torch.ops.engine_kernels.argmax_rows(t)
        assert torch.equal(got, t.argmax(dim=-1))
    assert torch.ops.engine_kernels.argmax_rows(x.to(dtype))[:5].tolist() == [
        x[0].argmax().item(), 10, 20, 0, 999]


@pytest.mark.slow
def test_greedy_float32_through_the_kernel_equals_transformers(compiled, make_hf_model):
    assert_greedy_float32_equals_transformers(make_hf_model("llama"))


def assert_greedy_float32_equals_transformers(model_dir) -> None:
    """24 greedy float32 tokens of three prompts (3, 40 and 17 tokens) from the
    engine, on whatever kernel path the environment selects, equal transformers'."""
    import transformers

    from engine import LLM, SamplingParams

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 1024) for _ in range(n)] for n in (3, 40, 17)]
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=1 << 22)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    llm.shutdown()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=24, min_new_tokens=24, pad_token_id=2)
        assert list(out.outputs[0].token_ids) == ref[0, len(prompt):].tolist()


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.MODE_ENV, "0")
    monkeypatch.setattr(kernels, "_loaded", None)
    assert kernels.kernels_available() is False
    assert not torch_sdpa._use_kernel(torch.zeros(2, 1, 4, 1, 8))


def test_kernel_path_variable_names_its_values(monkeypatch):
    """ENGINE_KERNEL_PATH takes portable, no-amx or auto (the default); anything
    else is an error naming the variable and the values, not a silent default."""
    for value, portable, aside in (("", False, False), ("auto", False, False),
                                   ("portable", True, True), ("NO-AMX", False, True)):
        monkeypatch.setenv(kernels.PATH_ENV, value)
        assert (kernels.portable_forced(), kernels.amx_set_aside()) == (portable, aside)
    monkeypatch.setenv(kernels.PATH_ENV, "noamx")
    with pytest.raises(ValueError, match=r"ENGINE_KERNEL_PATH='noamx'.*portable, no-amx"):
        kernels.amx_set_aside()


def test_bf16_products_widened_without_bf16_arithmetic(compiled, monkeypatch):
    """``ENGINE_CPU_NATIVE_BF16=0`` (a CPU without AMX or AVX512-BF16): no oneDNN copy
    of a bf16 weight is made, up to WIDENED_GEMV_MAX_ROWS rows run the bf16 GEMV and
    more rows are multiplied in float32 and rounded once (within bf16 rounding of the
    float64 product); with bf16 arithmetic the weight is packed for oneDNN."""
    import engine.ops.linear as linear_module
    from engine.ops import RowParallelLinear
    from engine.ops.linear import (
        WIDENED_GEMV_MAX_ROWS,
        onednn_packing_supported,
        pack_linear_weights,
        widened_linear,
    )

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    for native in ("1", "0"):
        monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", native)
        with torch.device("cpu"):
            layer = RowParallelLinear(64, 96, bias=True).to(torch.bfloat16)
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
        pack_linear_weights(layer)
        packable = native == "1" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert onednn_packing_supported(weight) == packable
        assert (layer.packed_weight is not None) == packable
    for rows in (1, 4, 5, WIDENED_GEMV_MAX_ROWS, WIDENED_GEMV_MAX_ROWS + 1, 64, 300):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        got = layer(x)
        if rows <= WIDENED_GEMV_MAX_ROWS:
            want = torch.empty(rows, 96, dtype=torch.bfloat16)
            torch.ops.engine_kernels.bf16_gemv(want, x, weight, bias, False)
        else:
            want = F.linear(x.float(), weight.float(), bias.float()).bfloat16()
        assert torch.equal(got, want), rows
        exact = F.linear(x.double(), weight.double(), bias.double())
        torch.testing.assert_close(widened_linear(x, weight, bias).double(), exact,
                                   atol=0, rtol=2**-8)
    # a weight widened in tiles (more output rows than one tile holds) gives the
    # product widened whole, bit for bit
    monkeypatch.setattr(linear_module, "WIDEN_TILE_BYTES", 16 * 64 * 4)
    x = torch.randn(37, 64, generator=gen).bfloat16()
    whole = F.linear(x.float(), weight.float(), bias.float()).bfloat16()
    assert torch.equal(widened_linear(x, weight, bias), whole)
    assert torch.equal(widened_linear(x, weight), F.linear(x.float(), weight.float()).bfloat16())
