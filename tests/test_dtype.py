"""`dtype="auto"` and bfloat16 generation.

"auto" follows the platform: on the CPU a float32 checkpoint runs in bfloat16 when
the CPU computes bf16 natively (AMX or AVX512-BF16), in float32 otherwise; other
checkpoint dtypes are kept. bfloat16 output cannot equal float32 transformers token
for token, so it is checked against transformers run in bfloat16 with a stated
threshold (below).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.model_loader import load_model
from engine.platforms.cpu import CpuPlatform, cpu_has_native_bf16

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "engine" / "default_model"

# Teacher-forced top-1 agreement: transformers (bf16) reads the engine's bf16
# greedy continuation, and at each generated position its argmax must be the
# engine's token in at least this share of positions. Both compute in bf16 but
# with different kernels (oneDNN prepacked matmuls, fused ops), so near-ties
# may flip; on the trained default model about 99% agree.
BF16_AGREEMENT = 0.95
PROMPTS = ["import ", "def fibonacci(n):", "class Stack:\n    def", "for i in range(",
           "# read a file\nwith open(", "return self."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("native", "checkpoint", "expected"), [
    ("1", "float32", "bfloat16"),
    ("0", "float32", "float32"),
    ("1", "bfloat16", "bfloat16"),
    ("0", "bfloat16", "bfloat16"),
    ("0", "float16", "float16"),
])
def test_cpu_auto_dtype(monkeypatch, native, checkpoint, expected):
    monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", native)
    assert CpuPlatform.resolve_auto_dtype(checkpoint) == expected


def test_native_bf16_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("ENGINE_CPU_NATIVE_BF16", raising=False)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


@pytest.mark.parametrize(("native", "expected"), [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_reaches_the_loaded_model(make_hf_model, monkeypatch, native, expected):
    from engine.models import register_builtin_models

    monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", native)
    register_builtin_models()
    model = load_model(EngineConfig(ModelConfig(model=str(make_hf_model("llama")))))
    assert {p.dtype for p in model.parameters()} == {expected}


# "no-amx": the kernels a CPU with AVX512-BF16 and no AMX (AMD Zen 4) runs, here too;
# "no-bf16": a CPU with neither (portable kernels, products widened to float32)
@pytest.mark.parametrize("path", ["auto", "no-amx", "no-bf16"])
def test_bfloat16_greedy_agrees_with_transformers_in_bfloat16(monkeypatch, path):
    import transformers
    from tokenizers import Tokenizer

    monkeypatch.setenv("ENGINE_KERNEL_PATH", "portable" if path == "no-bf16" else path)
    if path == "no-bf16":
        monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", "0")
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    llm = LLM(dtype="bfloat16", kv_cache_memory=1 << 22)
    with torch.profiler.profile() as prof:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32,
                                                       ignore_eos=True))
    model = llm.llm_engine.executor.worker.model_runner.model
    amx_copies = sum(getattr(m, "amx_weight", None) is not None for m in model.modules())
    onednn_copies = sum(getattr(m, "packed_weight", None) is not None
                        or getattr(m, "packed_gate", None) is not None for m in model.modules())
    llm.shutdown()
    names = {e.name for e in prof.events()}
    amx_calls = {name for name in names if "amx" in name}
    if path != "auto":  # neither a weight packed for the AMX kernels nor a call of theirs
        assert amx_copies == 0 and not amx_calls, amx_calls
    if path == "no-bf16":  # no oneDNN copy and no oneDNN bf16 product: widened ones
        assert onednn_copies == 0 and "mkldnn::_linear_pointwise" not in names
        assert "aten::mm" in names or "aten::addmm" in names
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL,
                                                           dtype=torch.bfloat16).eval()
    agree = total = 0
    for prompt, out in zip(prompts, outputs, strict=True):
        ours = list(out.outputs[0].token_ids)
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1]
        agree += sum(a == b for a, b in zip(logits.argmax(-1).tolist(), ours, strict=True))
        total += len(ours)
    assert agree / total >= BF16_AGREEMENT, f"{agree}/{total} positions agree"


def test_prepacked_bf16_linear_layers_compute_what_f_linear_computes():
    from engine.ops import MergedColumnParallelLinear, ParallelLMHead, RowParallelLinear
    from engine.ops.linear import onednn_packing_supported, pack_linear_weights

    torch.manual_seed(0)
    with torch.device("cpu"):
        layers = torch.nn.ModuleList([MergedColumnParallelLinear(64, [96, 96], bias=True),
                                      RowParallelLinear(96, 64, bias=False),
                                      ParallelLMHead(128, 64)]).to(torch.bfloat16)
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            torch.nn.init.normal_(layer.bias)
    # a CPU without bfloat16 arithmetic (or a torch without oneDNN bf16) packs
    # nothing: its bf16 products are widened to float32, the same sums
    packs = onednn_packing_supported(layers[0].weight)
    x = {64: torch.randn(5, 64, dtype=torch.bfloat16), 96: torch.randn(5, 96, dtype=torch.bfloat16)}
    plain = [layers[0](x[64]), layers[1](x[96]), layers[2].compute_logits(x[64])]
    assert pack_linear_weights(layers) == (3 if packs else 0)
    assert all((layer.packed_weight is not None) == packs for layer in layers)
    packed = [layers[0](x[64]), layers[1](x[96]), layers[2].compute_logits(x[64])]
    for a, b in zip(plain, packed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    # against float32 products of the same bf16 values, on every CPU (where nothing is
    # packed, the two runs above take one route): only the output's rounding differs
    f32 = torch.nn.functional.linear
    want = [f32(x[64].float(), layers[0].weight.float(), layers[0].bias.float()),
            f32(x[96].float(), layers[1].weight.float()),
            f32(x[64].float(), layers[2].weight.float())]
    for got, ref in zip(packed, want, strict=True):
        torch.testing.assert_close(got.float(), ref, atol=1e-1, rtol=1e-2)
