"""The float32 decode kernel (engine_kernels::fp32_gemv) on every path this CPU
runs: the AVX-512 one where the CPU has it, the AVX2 one where it has AVX2 and FMA
but not AVX-512, and the portable vector-extension one, forced with ``ENGINE_KERNEL_PATH=portable`` (or the op's `portable`
argument) so that it is tested on every machine; the same for the bf16 GEMV's
portable path (its AVX512-BF16 and AMX paths: tests/test_cpu_kernels.py).

The kernel sums in another order than BLAS, so float32 greedy output through it
is not promised to equal transformers token for token (the reference path,
``ENGINE_CPU_KERNELS=0``, is: tests/test_models_llama.py). What is promised, and
asserted here: teacher-forced top-1 agreement with transformers of at least
TOP1_AGREEMENT, and log-probabilities within LOGPROB_ATOL."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import onednn_packs_bf16
from test_cpu_kernels import assert_greedy_float32_equals_transformers

import engine.kernels as kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOP1_AGREEMENT = 0.995
LOGPROB_ATOL = 1e-4



def _cpu_flags() -> set[str]:
    return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())


def test_native_path_follows_the_cpu_flags(compiled):
    flags = _cpu_flags()
    expected = ("avx512" if "avx512f" in flags else
                "avx2" if {"avx2", "fma"} <= flags else "portable")
    assert torch.ops.engine_kernels.fp32_gemv_path() == expected


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize(("n", "k"), [(96, 576), (37, 70), (5, 33), (16, 16)])  # tails in N, K
def test_fp32_gemv_matches_linear(compiled, portable, n, k):
    """Every row count 1-32 (chunks of 6 input rows and every remainder), with and
    without a bias, against F.linear in float64."""
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    for rows in range(1, 33):
        x = torch.randn(rows, k, generator=gen)
        for b in (None, bias):
            out = torch.full((rows, n), float("nan"))
            torch.ops.engine_kernels.fp32_gemv(out, x, weight, b, portable)
            ref = F.linear(x.double(), weight.double(), None if b is None else b.double())
            torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="1 to 32 rows"):
        torch.ops.engine_kernels.fp32_gemv(torch.empty(33, n), torch.zeros(33, k), weight, None,
                                           portable)
    with pytest.raises(RuntimeError, match="float32 tensors only"):
        torch.ops.engine_kernels.fp32_gemv(torch.empty(1, n), torch.zeros(1, k).double(),
                                           weight, None, portable)


@pytest.mark.parametrize("path", ["auto", "portable", "no-amx"])
def test_plain_linear_routes_float32_rows(compiled, monkeypatch, path):
    """`plain_linear` hands float32 rows up to `fp32_gemv_max_rows` (32; 16 where
    the GEMV's native code is the AVX2 path) to the kernel on the path
    ENGINE_KERNEL_PATH names, and more rows to F.linear."""
    from engine.ops.linear import (
        FP32_GEMV_MAX_ROWS,
        FP32_GEMV_MAX_ROWS_AVX2,
        fp32_gemv_max_rows,
        plain_linear,
    )

    avx2 = torch.ops.engine_kernels.fp32_gemv_path() == "avx2"
    assert fp32_gemv_max_rows() == (FP32_GEMV_MAX_ROWS_AVX2 if avx2 else FP32_GEMV_MAX_ROWS)
    monkeypatch.setenv(kernels.PATH_ENV, path)
    gen = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(48, 80, generator=gen), torch.randn(48, generator=gen)
    for rows in (1, 7, fp32_gemv_max_rows()):
        x = torch.randn(rows, 80, generator=gen)
        direct = torch.empty(rows, 48)
        torch.ops.engine_kernels.fp32_gemv(direct, x, weight, bias, path == "portable")
        assert torch.equal(plain_linear(x, weight, bias), direct)  # the kernel's own result
    x = torch.randn(fp32_gemv_max_rows() + 1, 80, generator=gen)
    assert torch.equal(plain_linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(plain_linear(x[:3].double(), weight.double()),
                       F.linear(x[:3].double(), weight.double()))


@pytest.mark.slow
@pytest.mark.parametrize(("path", "step_tokens"),
                         [("auto", 32), ("portable", 32), ("auto", 2048), ("no-amx", 2048)])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_fast_path_teacher_forced_agrees_with_transformers(compiled, make_hf_model,
                                                                 monkeypatch, path, arch,
                                                                 step_tokens):
    """Teacher forcing: for every position of a few random sequences, the engine
    predicts one token after the true prefix. With at most 32 tokens per step
    (``max_num_batched_tokens=32``) every linear layer and the LM head run the
    float32 kernel (on an AVX2 CPU up to 16 rows, oneDNN past them); with 2048, steps hold many prompts and the prompt path runs
    (on an AMX CPU the split kernel, three bfloat16 tile products a float32 one;
    elsewhere, and with ``ENGINE_KERNEL_PATH=no-amx``, oneDNN on packed weights;
    SiLU-and-mul inside the gate/up products). Its top-1
    agrees with transformers' argmax at that position at least TOP1_AGREEMENT of
    the time and its log-probability of its token is within LOGPROB_ATOL of
    transformers'."""
    import transformers

    from engine import LLM, SamplingParams

    monkeypatch.setenv(kernels.PATH_ENV, path)
    model_dir = make_hf_model(arch)
    rng = random.Random(11)
    sequences = [[rng.randrange(3, 1024) for _ in range(64)] for _ in range(4)]
    starts = range(4, 64)
    prompts = [seq[:t] for seq in sequences for t in starts]
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=1 << 24,
              max_num_batched_tokens=step_tokens)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                                logprobs=1))
    llm.shutdown()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor(sequences)).logits.double(), dim=-1)
    agree, worst = 0, 0.0
    for i, out in enumerate(outs):
        seq, t = divmod(i, len(starts))
        pos = starts[t] - 1  # the logits that predict token starts[t]
        token = out.outputs[0].token_ids[0]
        agree += token == int(ref[seq, pos].argmax())
        worst = max(worst, abs(out.outputs[0].logprobs[0][token] - float(ref[seq, pos, token])))
    assert agree / len(outs) >= TOP1_AGREEMENT, f"top-1 agreement {agree}/{len(outs)}"
    assert worst <= LOGPROB_ATOL, f"largest log-probability difference {worst:.2e}"


@pytest.mark.slow
def test_reference_path_greedy_float32_equals_transformers(make_hf_model, monkeypatch):
    """``ENGINE_CPU_KERNELS=0``: no compiled kernel at all, greedy float32 tokens
    equal transformers' token for token."""
    monkeypatch.setenv(kernels.MODE_ENV, "0")
    monkeypatch.setattr(kernels, "_loaded", None)
    assert_greedy_float32_equals_transformers(make_hf_model("llama"))
    assert kernels.kernels_available() is False


def test_float32_prompt_chunks_use_packed_onednn_only_with_the_kernels(compiled, monkeypatch):
    """With the kernels, a float32 weight is packed for oneDNN (on a CPU without
    AMX; with AMX it gets the split copy instead: test_cpu_kernels.py): prompt-sized
    products run oneDNN (within float32 reassociation of F.linear), decode-sized
    ones the GEMV kernel. With ``ENGINE_CPU_KERNELS=0`` nothing float32 is packed."""
    from engine.ops import ColumnParallelLinear
    from engine.ops.linear import (
        FP32_GEMV_MAX_ROWS,
        onednn_packing_supported,
        pack_linear_weights,
        pack_weight,
        packed_linear,
    )

    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    assert onednn_packing_supported(weight)
    layer = ColumnParallelLinear(64, 96)
    layer.weight.data, layer.bias.data = weight.clone(), bias.clone()
    assert pack_linear_weights(torch.nn.ModuleList([layer])) == 1
    amx = bool(torch.ops.engine_kernels.amx_supported())
    assert (layer.amx_weight is not None) == amx and (layer.packed_weight is None) == amx
    packed = pack_weight(weight)
    x = torch.randn(FP32_GEMV_MAX_ROWS + 40, 64, generator=gen)
    got = packed_linear(x, packed, bias, weight)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    direct = torch.empty(5, 96)
    torch.ops.engine_kernels.fp32_gemv(direct, x[:5].contiguous(), weight, bias, False)
    assert torch.equal(packed_linear(x[:5].contiguous(), packed, bias, weight), direct)
    monkeypatch.setenv(kernels.MODE_ENV, "0")
    monkeypatch.setattr(kernels, "_loaded", None)
    assert not onednn_packing_supported(weight)
    assert onednn_packing_supported(weight.bfloat16()) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _mapping_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping of this process that holds `address` (None: unmapped)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return None


def test_large_weights_get_a_huge_page_mapping(monkeypatch):
    """With ENGINE_WEIGHT_HUGE_PAGES=1 a weight of a huge page or more (through the
    layers' parameter constructor) lies 2 MiB-aligned in a mapping advised for huge
    pages ("hg"), which goes away with the tensor; smaller ones, and every one with
    the variable unset (the default) or 0, are plain torch.empty memory."""
    import gc

    from engine.ops import ColumnParallelLinear
    from engine.ops.weight_memory import ENV, HUGE_PAGE, empty_weight

    monkeypatch.delenv(ENV, raising=False)
    assert "hg" not in (_mapping_flags(empty_weight(1024, 1024).data_ptr()) or [])
    monkeypatch.setenv(ENV, "1")
    layer = ColumnParallelLinear(576, 3072, bias=True)  # 7 MB weight, 12 KB bias
    weight = layer.weight
    assert weight.shape == (3072, 576) and weight.dtype == torch.float32
    assert weight.data_ptr() % HUGE_PAGE == 0
    assert "hg" in _mapping_flags(weight.data_ptr())
    assert "hg" not in (_mapping_flags(layer.bias.data_ptr()) or [])
    weight.data.fill_(1.5)  # writable, the whole of it
    assert float(weight.sum()) == 1.5 * weight.numel()
    address = weight.data_ptr()
    del layer, weight
    gc.collect()
    assert _mapping_flags(address) is None or "hg" not in _mapping_flags(address)
    bf16 = empty_weight(2048, 1024, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and "hg" in _mapping_flags(bf16.data_ptr())
    monkeypatch.setenv(ENV, "0")
    plain = empty_weight(1024, 1024)
    assert "hg" not in (_mapping_flags(plain.data_ptr()) or [])


def test_sleep_mode_restores_large_weights_in_huge_pages(monkeypatch):
    """Weights that sleep mode (level 1) wrote out come back into huge-page
    mappings, with their values."""
    from engine.ops import RowParallelLinear
    from engine.ops.weight_memory import ENV
    from engine.worker.sleep import offload_weights, restore_weights

    monkeypatch.setenv(ENV, "1")
    layer = RowParallelLinear(1536, 576, bias=False)
    layer.weight.data.copy_(torch.randn(576, 1536, generator=torch.Generator().manual_seed(5)))
    before = layer.weight.detach().clone()
    restore_weights(offload_weights(layer, keep=True))
    assert torch.equal(layer.weight, before)
    assert "hg" in _mapping_flags(layer.weight.data_ptr())


def test_bf16_gemv_native_path_follows_the_cpu_flags(compiled):
    expected = "avx512_bf16" if "avx512_bf16" in _cpu_flags() else "portable"
    assert torch.ops.engine_kernels.bf16_gemv_path() == expected


@pytest.mark.parametrize(("n", "k"), [(64, 576), (37, 70)])
def test_bf16_gemv_portable_path_matches_linear(compiled, monkeypatch, n, k):
    """The bf16 GEMV's portable code on any CPU (the op's `portable` argument), and
    `packed_linear` taking it, AMX aside, under ENGINE_KERNEL_PATH=portable."""
    from engine.ops.linear import GEMV_MAX_ROWS, pack_weight, pack_weight_for_amx, packed_linear

    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    for rows in range(1, 9):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        torch.ops.engine_kernels.bf16_gemv(out, x, weight, bias, True)
        ref = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    monkeypatch.setenv(kernels.PATH_ENV, "portable")
    # no oneDNN copy where bf16 products are widened: plain_linear takes the kernel
    packed = pack_weight(weight) if onednn_packs_bf16() else None
    amx = pack_weight_for_amx(weight) if n % 16 == 0 and k % 32 == 0 else None
    x = torch.randn(GEMV_MAX_ROWS, k, generator=gen).bfloat16()
    direct = torch.empty(GEMV_MAX_ROWS, n, dtype=torch.bfloat16)
    torch.ops.engine_kernels.bf16_gemv(direct, x, weight, bias, True)
    assert torch.equal(packed_linear(x, packed, bias, weight, amx), direct)
