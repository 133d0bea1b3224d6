"""Fast paths (engine.ops.fast_path): a model's steps run from its ops' fast forms,
without module calls.

Each comparison runs the model's forward twice on one real step of a real engine
(its inputs captured as the model runner passes them), with ``ENGINE_FAST_PATH=0``
(through the modules) and ``=1`` (the fast path; decode steps whose products are
all compiled kernels' run as one ``engine_kernels::decode_layers`` call, checked to
happen, and op by op under ``=ops``): the hidden states, and the keys and values
the step writes to the cache, must be equal
bit for bit, on decode steps over every weight kind the fast forms take (bfloat16
and float32 GEMV/AMX kernels, GGUF blocks), on row counts past each kernel's limit
(where a fast form hands the product back to its layer), on prompt steps (whole
prompts, a prefix-cache hit, prompts next to decoding rows), under
``ENGINE_KERNEL_PATH=portable``, without the compiled kernels, and with a forward
hook (which must still run)."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import onednn_packs_bf16, subprocess_env
from test_gguf import write_gguf

from engine import LLM, SamplingParams
from engine.attention.backends.torch_sdpa import prefill_kernel_vectors_fit
from engine.ops.fast_path import FAST_PATH_ENV

pytestmark = pytest.mark.usefixtures("compiled")  # the fast forms are the kernels' calls


def _capture_decode_step(llm: LLM, batch: int) -> tuple[torch.nn.Module, tuple]:
    """The model and the inputs of one decode step of `batch` sequences (fresh
    prompts of different lengths, every prompt already computed)."""
    engine = llm.llm_engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(3, 1000) for _ in range(rng.randrange(3, 40))], params)
    for _ in range(3):  # the prompts (one step), then decode steps
        engine.step()
    model, args = _capture_step(llm)
    assert args[2].max_query_len == 1, "not a decode step"
    return model, args


def _capture_step(llm: LLM) -> tuple[torch.nn.Module, tuple]:
    """The model and the inputs of the engine's next step."""
    model = llm.llm_engine.executor.worker.model_runner.model
    captured: list[tuple] = []
    handle = model.register_forward_pre_hook(lambda _module, args: captured.append(args))
    llm.llm_engine.step()
    handle.remove()
    (args,) = captured
    return model, args


def _both_ways(model: torch.nn.Module, args: tuple,
               monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's output through the modules, then by the fast path; the step's
    cache slots are cleared between the two, and must hold the same keys and
    values after each."""
    from engine.attention.layer import get_attention_layers

    caches = [layer.kv_cache for layer in get_attention_layers(model)]
    slots = args[2].slot_mapping
    with torch.inference_mode():
        monkeypatch.setenv(FAST_PATH_ENV, "0")
        through_modules = model(*args)
        written = [cache.clone() for cache in caches]
        for cache in caches:
            if cache.numel():
                cache.view(2, -1, *cache.shape[-2:])[:, slots] = 0
        monkeypatch.setenv(FAST_PATH_ENV, "1")
        fast = model(*args)
    assert all(torch.equal(cache, before) for cache, before in zip(caches, written, strict=True))
    return through_modules, fast


def _one_call(model: torch.nn.Module, args: tuple, monkeypatch: pytest.MonkeyPatch,
              mode: str = "1") -> tuple[torch.Tensor, bool]:
    """The step's output on the fast path under ``ENGINE_FAST_PATH=mode``, and
    whether its layers ran as one ``decode_layers`` call (the operators the
    profiler saw: that op, whose calls it records as each layer's)."""
    monkeypatch.setenv(FAST_PATH_ENV, mode)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = model(*args)
    names = [event.name for event in prof.events()]
    calls = names.count("engine_kernels::decode_layers")
    assert calls in (0, 1)
    assert names.count("engine_kernels::paged_decode_attention") == len(model.model.layers)
    return out, calls == 1


def _attention_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of the attention backend's `forward` calls (the fast path's
    attention form makes none on the steps it takes)."""
    from engine.attention.backends.torch_sdpa import TorchSDPAImpl

    calls = [0]
    forward = TorchSDPAImpl.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(TorchSDPAImpl, "forward", counted)
    return calls


@pytest.fixture(scope="module")
def wide_llama(make_hf_model) -> Path:
    """Rows of 256 values (GGUF K-quant blocks), tied embeddings like SmolLM2."""
    return make_hf_model("llama", hidden_size=256, intermediate_size=512,
                         tie_word_embeddings=True)


@pytest.mark.parametrize(("arch", "dtype", "batch"), [
    ("llama", "float32", 1),  # the float32 GEMV
    ("llama", "bfloat16", 2),  # the bf16 GEMV
    ("llama", "bfloat16", 20),  # the AMX kernel (where the CPU has it), else oneDNN
    ("llama", "bfloat16", 40),  # past the few-row sizes: the AMX kernel, SiLU in gate_up
    ("llama", "float32", 12),  # the float32 GEMV (the split AMX kernel with AMX)
    # the split AMX kernel (where the CPU has AMX), else the GEMV; on an AVX2 CPU
    # (fp32_gemv_max_rows 16) oneDNN on the packed weights, SiLU in gate_up
    ("llama", "float32", 20),
    ("llama", "float32", 40),  # past the float32 GEMV's rows: split AMX or oneDNN, via the layer
    ("qwen2", "bfloat16", 3),  # q/k/v biases
])
def test_decode_steps_equal_the_modules_bit_for_bit(make_hf_model, monkeypatch, arch, dtype,
                                                    batch):
    """Where every product of the step is a compiled kernel's, the layers run as
    one ``engine_kernels::decode_layers`` call (checked to happen), else op by op."""
    with LLM(make_hf_model(arch), dtype=dtype, kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        model, args = _capture_decode_step(llm, batch)
        through_modules, fast = _both_ways(model, args, monkeypatch)
        fast_path = model.model.fast_path
        _, one_call = _one_call(model, args, monkeypatch)
        op_by_op, ops_one_call = _one_call(model, args, monkeypatch, "ops")
    assert fast_path is not None and fast_path.rotary is not None and fast_path.layers  # it ran
    assert torch.equal(through_modules, fast) and torch.equal(through_modules, op_by_op)
    amx = bool(torch.ops.engine_kernels.amx_supported())
    assert one_call == (batch <= 4 or (dtype == "float32" and batch <= 32)
                        or (dtype == "bfloat16" and amx))
    assert not ops_one_call  # ENGINE_FAST_PATH=ops: every call from Python


@pytest.mark.parametrize("path", ["portable", "no-amx"])
@pytest.mark.parametrize("batch", [20, 40])
def test_bf16_decode_without_amx_runs_onednn_in_one_call(make_hf_model, monkeypatch, batch,
                                                         path):
    """``ENGINE_KERNEL_PATH=portable`` or ``no-amx`` keeps the AMX kernels out, as on a
    CPU without AMX: bf16 decode steps of 5-32 rows are oneDNN's products on the
    packed weights (gate_up with SiLU and the multiply inside), which the one call
    makes too; past 32 rows (padded to a bucket) the layers run op by op. On a CPU
    without bfloat16 arithmetic nothing is packed for oneDNN and the one call stops
    at the GEMV's rows (test_bf16_decode_with_widened_products)."""
    monkeypatch.setenv("ENGINE_KERNEL_PATH", path)
    with LLM(make_hf_model("llama"), dtype="bfloat16", kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        model, args = _capture_decode_step(llm, batch)
        through_modules, fast = _both_ways(model, args, monkeypatch)
        _, one_call = _one_call(model, args, monkeypatch)
    assert torch.equal(through_modules, fast)
    assert one_call == (batch <= (32 if onednn_packs_bf16() else 4))


@pytest.mark.parametrize("batch", [3, 20])
def test_bf16_decode_with_widened_products(make_hf_model, monkeypatch, batch):
    """On a CPU without bfloat16 arithmetic (``ENGINE_CPU_NATIVE_BF16=0``, with the
    portable kernels: neither AMX nor AVX512-BF16 in use) no weight is packed for
    oneDNN; a decode step of up to GEMV_MAX_ROWS rows runs the bf16 GEMV in one
    call, more rows run op by op with the products widened to float32, bit-equal
    to the modules either way."""
    monkeypatch.setenv("ENGINE_KERNEL_PATH", "portable")
    monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", "0")
    with LLM(make_hf_model("llama"), dtype="bfloat16", kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        model, args = _capture_decode_step(llm, batch)
        assert not any(getattr(m, "packed_weight", None) is not None
                       or getattr(m, "packed_gate", None) is not None for m in model.modules())
        through_modules, fast = _both_ways(model, args, monkeypatch)
        _, one_call = _one_call(model, args, monkeypatch)
    assert torch.equal(through_modules, fast)
    assert one_call == (batch <= 4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prompt_steps_equal_the_modules_bit_for_bit(make_hf_model, monkeypatch, dtype):
    """Whole fresh prompts in one step; then, next to those decoding, a prompt that
    starts with one of theirs (a prefix-cache hit) and a fresh one. Where a step's
    rows all run on the compiled attention kernels (float32 here; bfloat16 takes
    them on AMX from head size 32, and this model's heads are 16), the fast path's
    attention runs from the backend's fast form, not its forward."""
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(make_hf_model("llama"), dtype=dtype, kv_cache_memory=1 << 22) as llm:
        prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (3, 70, 200)]
        for prompt in prompts:
            llm.llm_engine.add_request(prompt, params)
        model, args = _capture_step(llm)
        assert args[2].max_query_len == 200
        forwards = _attention_forwards(monkeypatch)
        whole = _both_ways(model, args, monkeypatch)
        layers = len(model.model.layers)
        plan = args[2].backend_state["TORCH_SDPA"]
        on_kernels = not plan.decode and not plan.prefills
        # float32 prefills take the kernel where the CPU has AVX-512 (torch_sdpa)
        assert on_kernels == (dtype == "float32" and prefill_kernel_vectors_fit())
        # the modules' run only, where the kernels take the step
        assert forwards[0] == (layers if on_kernels else 2 * layers)
        llm.llm_engine.step()
        llm.llm_engine.add_request(prompts[2][:160] + [7, 8, 9], params)  # 10 cached blocks
        llm.llm_engine.add_request([rng.randrange(3, 1000) for _ in range(50)], params)
        model, args = _capture_step(llm)
        assert 1 in args[2].query_lens and max(args[2].query_lens) == 50
        forwards[0] = 0
        mixed = _both_ways(model, args, monkeypatch)
        assert forwards[0] == (layers if on_kernels else 2 * layers)
    assert torch.equal(*whole) and torch.equal(*mixed)


@pytest.mark.parametrize(("qtype", "dtype", "batch"), [
    ("Q8_0", "bfloat16", 2),  # interleaved blocks, int8 activations
    ("Q4_1", "bfloat16", 20),  # past the block kernel's rows: padded, through the layer
    ("Q4_K", "float32", 1),  # a K-quant, float activations
])
def test_decode_steps_equal_the_modules_on_gguf_blocks(wide_llama, tmp_path, monkeypatch,
                                                       qtype, dtype, batch):
    path = write_gguf(wide_llama, tmp_path / f"tiny-{qtype}.gguf", qtype)
    with LLM(str(path), dtype=dtype, kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        assert llm.llm_engine.quantized_layers()["model.layers.0.mlp.down_proj"] == [qtype.lower()]
        model, args = _capture_decode_step(llm, batch)
        through_modules, fast = _both_ways(model, args, monkeypatch)
        _, one_call = _one_call(model, args, monkeypatch)
    assert torch.equal(through_modules, fast)
    assert one_call == (batch <= 16)  # the block kernels' calls, up to where rows are padded


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_a_step_of_decode_rows_takes_up_to_48_quantized_rows_in_the_one_call(
        wide_llama, tmp_path, monkeypatch, dtype):
    """In a step the model runner says is of decode rows only (`step_rows`), the
    interleaved block kernels take up to 48 rows whole (float32 activations that
    `auto` chose included, ENGINE_CPU_NATIVE_BF16=0): the step runs as one call,
    equal bit for bit to the fast forms and to the modules."""
    from engine.quantization import step_rows
    from engine.quantization.ggml import interleaves

    if dtype == "auto":
        monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", "0")
    path = write_gguf(wide_llama, tmp_path / "tiny-Q4_1.gguf", "Q4_1")
    with LLM(str(path), dtype=dtype, kv_cache_memory=1 << 23, max_num_seqs=24,
             enable_prefix_caching=False) as llm:
        model, args = _capture_decode_step(llm, 24)
        with step_rows(True):
            through_modules, fast = _both_ways(model, args, monkeypatch)
            one_call_out, one_call = _one_call(model, args, monkeypatch)
            op_by_op, _ = _one_call(model, args, monkeypatch, "ops")
        # the same rows outside such a step: through the modules (float32: the
        # float tiles)
        outside, outside_one_call = _one_call(model, args, monkeypatch)
    assert one_call == interleaves() and not outside_one_call
    assert torch.equal(through_modules, fast) and torch.equal(through_modules, one_call_out)
    assert torch.equal(through_modules, op_by_op)
    if dtype == "auto" and interleaves():  # float32 rows outside: not rounded to int8
        assert not torch.equal(outside, through_modules)


def test_layers_of_several_block_types_run_in_the_one_call(wide_llama, tmp_path, monkeypatch):
    """llama.cpp's mixed presets (Q4_K_M...) give a layer's fused parts different
    block types: a Q8_0 value projection beside Q5_0 query and key rows, a Q4_1 up
    projection beside a Q5_0 gate. Each range is its own kernel call into its columns
    of one output, on the fast path and inside the one call, equal to the modules'."""
    path = write_gguf(wide_llama, tmp_path / "tiny-mixed.gguf", "Q5_0",
                      qtypes={"attn_v": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q6_K"})
    with LLM(str(path), dtype="bfloat16", kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        layers = llm.llm_engine.quantized_layers()
        assert layers["model.layers.0.self_attn.qkv_proj"] == ["q5_0", "q8_0"]
        assert layers["model.layers.0.mlp.gate_up_proj"] == ["q5_0", "q4_1"]
        assert layers["model.layers.0.mlp.down_proj"] == ["q6_k"]
        model, args = _capture_decode_step(llm, 3)
        through_modules, fast = _both_ways(model, args, monkeypatch)
        one_call_out, one_call = _one_call(model, args, monkeypatch)
        op_by_op, _ = _one_call(model, args, monkeypatch, "ops")
    assert one_call
    assert torch.equal(through_modules, fast) and torch.equal(through_modules, one_call_out)
    assert torch.equal(through_modules, op_by_op)


def test_without_the_kernels_the_fast_path_runs_the_modules_forwards(make_hf_model):
    """ENGINE_CPU_KERNELS=0 (or kernels not built yet), in a process that never
    loaded them: no op has a fast form, the fast path calls each module's forward
    (the reference path) and decodes what the modules decode."""
    script = textwrap.dedent(f"""
        import os
        from engine import LLM, SamplingParams
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        tokens = []
        for flag in ("1", "0"):
            os.environ["{FAST_PATH_ENV}"] = flag
            with LLM({str(make_hf_model("llama"))!r}, dtype="float32",
                     kv_cache_memory=1 << 22) as llm:
                tokens.append([o.outputs[0].token_ids
                               for o in llm.generate([[3, 4, 5], [9] * 20], params)])
        assert tokens[0] == tokens[1], tokens
        print("equal")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=subprocess_env(ENGINE_CPU_KERNELS="0"))
    assert result.returncode == 0 and "equal" in result.stdout, result.stderr[-3000:]


def test_a_changed_kernel_path_rebuilds_the_fast_path(make_hf_model, monkeypatch):
    """ENGINE_KERNEL_PATH is read when a fast path is built: setting it between two
    steps must reach the kernels as it reaches them through the modules."""
    with LLM(make_hf_model("llama"), dtype="bfloat16", kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        model, args = _capture_decode_step(llm, 2)
        _both_ways(model, args, monkeypatch)
        before = model.model.fast_path
        monkeypatch.setenv("ENGINE_KERNEL_PATH", "portable")
        through_modules, fast = _both_ways(model, args, monkeypatch)
        assert model.model.fast_path is not before
        assert torch.equal(through_modules, fast)


def test_a_forward_hook_still_runs_and_sees_the_same_step(make_hf_model, monkeypatch):
    with LLM(make_hf_model("llama"), dtype="float32", kv_cache_memory=1 << 22,
             enable_prefix_caching=False) as llm:
        model, args = _capture_decode_step(llm, 2)
        mlp = model.model.layers[1].mlp
        seen: list[torch.Tensor] = []
        handle = mlp.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
        try:
            through_modules, fast = _both_ways(model, args, monkeypatch)
        finally:
            handle.remove()
    assert len(seen) == 2  # a hook makes the step run through the modules, both times
    assert torch.equal(seen[0], seen[1]) and torch.equal(through_modules, fast)


def test_generation_is_the_same_with_and_without_the_fast_path(make_hf_model, monkeypatch):
    """Whole requests, sampled and greedy, through `LLM.generate`."""
    prompts = [[5, 17, 300, 41], [9] * 30, [600, 2, 77]]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv(FAST_PATH_ENV, flag)
        with LLM(make_hf_model("llama"), dtype="bfloat16", kv_cache_memory=1 << 22) as llm:
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]


def test_sleep_drops_the_fast_path_and_wake_up_builds_it_again(make_hf_model):
    """The fast path holds the weights it was built with: sleep must drop it (or the
    memory would stay), and the woken model decodes as before."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(make_hf_model("llama"), dtype="float32", enable_sleep_mode=True,
             kv_cache_memory=1 << 22) as llm:
        before = llm.generate([[3, 4, 5, 6]], params)[0].outputs[0].token_ids
        model = llm.llm_engine.executor.worker.model_runner.model
        assert model.model.fast_path is not None
        llm.sleep(level=1)
        assert model.model.fast_path is None
        llm.wake_up()
        after = llm.generate([[3, 4, 5, 6]], params)[0].outputs[0].token_ids
        assert model.model.fast_path is not None
    assert after == before


@pytest.mark.parametrize("value", ["yes", "2"])
def test_a_bad_value_names_the_variable(make_hf_model, monkeypatch, value):
    monkeypatch.setenv(FAST_PATH_ENV, value)
    with pytest.raises(ValueError, match=FAST_PATH_ENV):
        with LLM(make_hf_model("llama"), dtype="float32", kv_cache_memory=1 << 22) as llm:
            llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3))


def test_decode_layers_names_a_malformed_argument():
    """The op checks its argument layout before touching a tensor."""
    hidden, positions = torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64)
    empty = torch.zeros(0, dtype=torch.int64)
    op = torch.ops.engine_kernels.decode_layers
    with pytest.raises(RuntimeError, match="decode_layers: ints must start with"):
        op(hidden, positions, [], [1], [], [], hidden, empty, empty, empty, empty, empty)
    with pytest.raises(RuntimeError, match="decode_layers: ints holds 7 values, expected 27"):
        op(hidden, positions, [], [1, 8, 8, 1, 1, 8, 0], [1.0], [], hidden, empty, empty, empty,
           empty, empty)
