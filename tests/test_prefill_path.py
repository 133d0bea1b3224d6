"""The prompt path (docs/prefill.md): the fused SwiGLU, where a gate_up projection
made with ``gated_activation=True`` keeps its gate and up halves packed apart for
oneDNN and for prompt-sized inputs computes ``silu(gate) * up`` inside the two
matmuls (`engine.ops.linear.onednn_silu_and_mul`) instead of writing the
[rows, 2 * d] projection and reading it back in `SiluAndMul`; and the KV cache's
memory on ordinary pages, so that a step's cache write never zeroes a huge page."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine.kernels as kernels
from engine.config import CompilationConfig, EngineConfig, ModelConfig, set_current_engine_config
from engine.ops import MergedColumnParallelLinear, SiluAndMul
from engine.ops.linear import AMX_MAX_ROWS, onednn_packing_supported, pack_linear_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread", "compiled")

IN, D = 64, 96
# bfloat16: the fused path rounds the gate once (after SiLU) where the unfused one
# rounds before and after it, and both round the product: within a few bf16 ulps
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _gated_layer(dtype: torch.dtype, bias: bool, seed: int = 0) -> MergedColumnParallelLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = MergedColumnParallelLinear(IN, [D, D], bias=bias, gated_activation=True)
    layer.weight.data = (torch.randn(2 * D, IN, generator=gen) / IN**0.5).to(dtype)
    if bias:
        layer.bias.data = torch.randn(2 * D, generator=gen).to(dtype)
    # a bf16 weight is not packed on a CPU without bfloat16 arithmetic (its products
    # are widened to float32 there: no oneDNN halves, no fused activation)
    packs = onednn_packing_supported(layer.weight)
    assert pack_linear_weights(torch.nn.ModuleList([layer])) == int(packs)
    return layer


def _reference(layer: MergedColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """silu(x G^T + g) * (x U^T + u) in float64 from the layer's own (rounded) values."""
    bias = None if layer.bias is None else layer.bias.double()
    gate_up = F.linear(x.double(), layer.weight.double(), bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, want.abs().max().item()), f"max error {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
# 3: the GEMV kernels; 20: the AMX kernel; 33-300: the gated AMX kernel (bf16 on an
# AMX CPU; float32: its split form); with the AMX kernels set aside (portable,
# no-amx) oneDNN fused, as on a CPU without AMX
@pytest.mark.parametrize("rows", [3, 20, AMX_MAX_ROWS + 1, 100, 300])
@pytest.mark.parametrize("path", ["auto", "portable", "no-amx"])
def test_gated_projection_equals_projection_then_silu_and_mul(monkeypatch, dtype, bias, rows,
                                                              path):
    monkeypatch.setenv(kernels.PATH_ENV, path)
    layer = _gated_layer(dtype, bias)
    assert layer.packed_weight is None
    if dtype == torch.float32 and path == "auto" and torch.ops.engine_kernels.amx_supported():
        # float32 on AMX: the split copy for amx_split_silu_and_mul, no oneDNN halves
        assert layer.amx_weight is not None and layer.packed_gate is None
    elif not onednn_packing_supported(layer.weight):
        assert layer.amx_weight is None and layer.packed_gate is None
    else:
        assert layer.packed_gate is not None and layer.packed_up is not None
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows)).to(dtype)
    want = _reference(layer, x)
    _assert_close(layer.silu_and_mul(x, SiluAndMul()), want, dtype)
    # the projection alone (what LoRA and a replaced activation get): both halves
    gate_up = layer(x)
    assert gate_up.shape == (rows, 2 * D)
    _assert_close(SiluAndMul()(gate_up), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_sized_inputs_run_no_separate_activation(dtype):
    layer = _gated_layer(dtype, bias=False)
    act = SiluAndMul()
    ran = {}
    for rows in (2, 200):
        x = torch.randn(rows, IN).to(dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            layer.silu_and_mul(x, act)
        ran[rows] = {event.key for event in prof.key_averages()}
    assert "engine_kernels::silu_and_mul" in ran[2]  # decode-sized: kernels, then SiLU-and-mul
    if not onednn_packing_supported(layer.weight):
        # bf16 without bfloat16 arithmetic: the projection widened, then the activation
        assert "engine_kernels::silu_and_mul" in ran[200] and "aten::linear" in ran[200]
        return
    assert "engine_kernels::silu_and_mul" not in ran[200]
    # prompts on an AMX CPU: the gated AMX kernel (float32: its split form);
    # otherwise the fused oneDNN pair
    if torch.ops.engine_kernels.amx_supported():
        fused = ("engine_kernels::amx_silu_and_mul" if dtype == torch.bfloat16
                 else "engine_kernels::amx_split_silu_and_mul")
    else:
        fused = "mkldnn::_linear_pointwise"
    assert fused in ran[200]


def test_lora_and_a_disabled_activation_take_the_unfused_path():
    layer = _gated_layer(torch.bfloat16, bias=False)
    x = torch.randn(100, IN).to(torch.bfloat16)
    want = _reference(layer, x)
    # LoRA adds its delta to the projection's output: the fused path would lose it
    layer.lora = lambda inp, out: out + 1.0
    gate, up = F.linear(x.double(), layer.weight.double()).chunk(2, -1)
    _assert_close(layer.silu_and_mul(x, SiluAndMul()), F.silu(gate + 1.0) * (up + 1.0),
                  torch.bfloat16)
    layer.lora = None
    # custom_ops="-silu_and_mul": forward_native, which the fused path must not bypass
    with set_current_engine_config(EngineConfig(
            ModelConfig(model="unused"),
            compilation_config=CompilationConfig(custom_ops=["-silu_and_mul"]))):
        disabled = SiluAndMul()
    assert not disabled.uses_cpu_forward() and SiluAndMul().uses_cpu_forward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = layer.silu_and_mul(x, disabled)
    assert "aten::silu" in {event.key for event in prof.key_averages()}
    _assert_close(got, want, torch.bfloat16)


def test_gated_activation_needs_two_equal_halves():
    with pytest.raises(ValueError, match="mlp.gate_up_proj: gated_activation needs two equal"):
        MergedColumnParallelLinear(IN, [D, 2 * D], gated_activation=True,
                                   prefix="mlp.gate_up_proj")


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] | None = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            fields = {} if start <= address < end else None
            if fields is not None:
                found = fields
        elif fields is not None:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return found


def test_kv_cache_memory_is_untouched_and_not_huge_pages():
    """The KV cache is filled a few blocks per step: a transparent huge page would
    be zeroed (and compacted for) 2 MiB at a time inside a step's cache write,
    so the cache's memory is advised to ordinary pages, and stays untouched
    (not resident) until written."""
    from engine.worker.worker import _zeroed_untouched

    cache = _zeroed_untouched((2, 2048, 16, 3, 64), torch.bfloat16, None)  # 24 MiB
    inside = cache.data_ptr() + (1 << 20)  # the allocation's first page may be shared
    mapping = _mapping_of(inside)
    assert "nh" in mapping["VmFlags"].split(), mapping["VmFlags"]
    assert int(mapping["Rss"].split()[0]) < 1024  # kB: nothing written yet
    cache[:, 100:300] = 1  # a few blocks written: only their pages become resident
    mapping = _mapping_of(inside)
    assert int(mapping["AnonHugePages"].split()[0]) == 0
    assert int(mapping["Rss"].split()[0]) < 8 * 1024
    assert cache[:, :100].abs().sum() == 0 and cache[0, 100:300].min() == 1


# Teacher-forced top-1 agreement of the engine's bf16 prompt steps with transformers
# in bf16 on the trained default model (different kernels, so near-ties may flip;
# the same bar as tests/test_dtype.py's greedy check)
BF16_PROMPT_AGREEMENT = 0.95


@pytest.mark.slow
def test_bf16_prompt_steps_agree_with_transformers():
    """Every prompt here is longer than AMX_MAX_ROWS tokens, so each layer's
    gate/up runs the fused oneDNN path: the engine predicts the token after each
    prefix of a real text, and its argmax agrees with transformers' at that
    position at least BF16_PROMPT_AGREEMENT of the time."""
    import transformers
    from tokenizers import Tokenizer

    from engine import LLM, SamplingParams

    model_dir = Path(__file__).resolve().parent.parent / "engine" / "default_model"
    text = (Path(__file__).resolve().parent.parent / "engine" / "ops" / "linear.py").read_text()
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids[:160]
    starts = range(AMX_MAX_ROWS + 8, len(ids), 4)
    llm = LLM(dtype="bfloat16", kv_cache_memory=1 << 24, enable_prefix_caching=False)
    outs = llm.generate([ids[:t] for t in starts],
                        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    llm.shutdown()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                           dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    agree = sum(out.outputs[0].token_ids[0] == ref[t - 1]
                for t, out in zip(starts, outs, strict=True))
    assert agree / len(outs) >= BF16_PROMPT_AGREEMENT, f"{agree}/{len(outs)} positions agree"


@pytest.mark.slow
def test_bf16_prompt_steps_on_amx_agree_with_onednn(make_hf_model, monkeypatch):
    """A bf16 model's prompt steps (33-512 rows) run their linears on the AMX kernel
    where the CPU has it (engine.ops.linear.AMX_PROMPT_MAX_ROWS), else on oneDNN.
    Teacher forcing over 60 prompts of 4-33 tokens in steps of up to 256 tokens: the
    AMX path's next token equals the oneDNN path's at least 99% of the time (both
    round to bf16, in other summation orders, and the gate is rounded at another
    point) and its log-probabilities are within 0.05."""
    from engine import LLM, SamplingParams
    from engine.ops import linear

    rng = random.Random(5)
    sequences = [[rng.randrange(3, 1024) for _ in range(64)] for _ in range(2)]
    prompts = [seq[:t] for seq in sequences for t in range(4, 34)]
    llm = LLM(make_hf_model("llama", hidden_size=128, intermediate_size=256), dtype="bfloat16",
              kv_cache_memory=1 << 24, max_num_batched_tokens=256, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=1)
    amx = bool(torch.ops.engine_kernels.amx_supported())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        on_amx = llm.generate(prompts, params)
    ran = {event.key for event in prof.key_averages()}
    assert ("engine_kernels::amx_silu_and_mul" in ran) == amx
    monkeypatch.setattr(linear, "AMX_PROMPT_MAX_ROWS", 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        on_onednn = llm.generate(prompts, params)
    assert "engine_kernels::amx_silu_and_mul" not in {e.key for e in prof.key_averages()}
    llm.shutdown()
    agree, worst = 0, 0.0
    for a, b in zip(on_amx, on_onednn, strict=True):
        token = b.outputs[0].token_ids[0]
        agree += a.outputs[0].token_ids[0] == token
        mine, theirs = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        if token in mine:
            worst = max(worst, abs(mine[token] - theirs[token]))
    assert agree / len(prompts) >= 0.99, f"top-1 agreement {agree}/{len(prompts)}"
    assert worst <= 0.05, f"largest log-probability difference {worst:.3f}"
