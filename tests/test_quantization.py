"""Quantized weights: the GGUF block kernels against dequantize-then-matmul on
every kernel path this CPU runs plus the portable one, GGUF files kept in their
blocks, quality against the same model dequantized to float32 (teacher-forced
greedy agreement) and against transformers' GGUF loading, quantizing a float
checkpoint at load, and a third-party quantization plugin through the registry
and the conformance kit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file, save_file
from test_gguf import PROMPT_IDS, transformers_greedy, write_gguf

from engine import LLM, SamplingParams, kernels
from engine.quantization import get_quantization_method
from engine.quantization.ggml import GGML_TYPES, PATHS, kernel_paths
from engine.quantization.kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

HERE = Path(__file__).resolve().parent
TYPES = list(GGML_TYPES)
K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
# max |kernel - reference| / max |reference|: the float path only reorders float32
# sums; the int8 paths quantize each 32-value chunk of x to int8 (about 0.5-1%)
FLOAT_PATH_TOL = 1e-5
INT8_PATH_TOL = 0.02
# teacher-forced greedy agreement with the float32-dequantized model, per format,
# over FORCED_TOKENS positions: the int8 kernels with float32 activations, so that
# only the quantization differs (bfloat16 activations alone move a few tokens of
# these random tiny models)
pytestmark = pytest.mark.usefixtures("compiled")  # every test here runs the kernels

AGREEMENT = {t: 0.98 for t in TYPES}
FORCED_TOKENS = 100



def _blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    if qtype in K_QUANTIZERS:
        return K_QUANTIZERS[qtype](values)
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, qtype))


def _reference(qtype: str, blocks: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    values = gguf.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def test_every_path_this_cpu_runs_is_found_from_cpuinfo():
    flags = kernels.cpu_flags()
    paths = kernel_paths()
    assert paths[-1] == "portable"
    assert ("avx2" in paths) == ("avx2" in flags)
    assert ("avx512_vnni" in paths) == ({"avx512_vnni", "avx512vl", "avx2"} <= flags)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_and_embedding_equal_the_gguf_package(qtype):
    rows, cols = 24, 512
    blocks = _blocks(qtype, rows, cols)
    ref = _reference(qtype, blocks, (rows, cols))
    method = get_quantization_method(qtype.lower())
    stored = method.from_gguf(torch.from_numpy(blocks), (rows, cols))
    packed = method.pack(method.from_gguf(torch.from_numpy(blocks.copy()), (rows, cols)))
    # 32-value types: one interleaved group, 8 rows as they are, where the best
    # int8 path has group kernels (avx512_vnni; avx2, with F16C and FMA)
    assert ("interleaved" in packed.tensors) == (GGML_TYPES[qtype][1] == 32
                                                 and kernel_paths()[0] in ("avx512_vnni", "avx2"))
    for weight in (stored, packed):
        assert weight.nbytes == blocks.nbytes  # the blocks, nothing widened
        assert torch.equal(method.dequantize(weight), ref)
        assert torch.equal(method.dequantize(weight, torch.bfloat16), ref.to(torch.bfloat16))
        ids = torch.tensor([5, 0, 23, 5, 16])
        assert torch.equal(method.embedding(weight, ids, torch.float32), ref[ids])


@pytest.mark.parametrize("qtype", [t for t in TYPES if GGML_TYPES[t][1] == 32])
def test_interleaving_keeps_every_byte_and_undoes(qtype):
    blocks = torch.from_numpy(_blocks(qtype, 40, 96))  # two groups of 16 and 8 rows as they are
    type_id = GGML_TYPES[qtype][0]
    interleaved, back = torch.empty_like(blocks), torch.empty_like(blocks)
    torch.ops.engine_kernels.ggml_interleave(interleaved, blocks, type_id)
    torch.ops.engine_kernels.ggml_interleave(back, interleaved, type_id, True)
    assert not torch.equal(interleaved[:32], blocks[:32])
    assert torch.equal(interleaved[32:], blocks[32:])
    assert torch.equal(back, blocks)
    in_place = blocks.clone()  # what `pack` does: no second copy of the weight
    torch.ops.engine_kernels.ggml_interleave(in_place, in_place, type_id)
    assert torch.equal(in_place, interleaved)
    torch.ops.engine_kernels.ggml_interleave(in_place, in_place, type_id, True)
    assert torch.equal(in_place, blocks)
    with pytest.raises(RuntimeError, match="no interleaved layout"):
        torch.ops.engine_kernels.ggml_interleave(back, blocks, GGML_TYPES["Q4_K"][0])


# 800 = 25 blocks of 32: the avx512_vnni path's last, unpaired block (the K-quants'
# rows are whole 256-value super-blocks). "interleaved": the 32-value types as
# `pack` stores them (40 rows: two groups of 16, 8 rows as the file has them)
@pytest.mark.parametrize(("qtype", "cols", "interleaved"), [
    (t, c, i) for t in TYPES for c in (768, 800) for i in (False, True)
    if c % GGML_TYPES[t][1] == 0 and (not i or GGML_TYPES[t][1] == 32)])
def test_linear_kernels_equal_dequantize_then_matmul_on_every_path(qtype, cols, interleaved):
    rows = 40
    blocks = _blocks(qtype, rows, cols, seed=1)
    ref_w = _reference(qtype, blocks, (rows, cols))
    wt = torch.from_numpy(blocks)
    type_id = GGML_TYPES[qtype][0]
    if interleaved:
        wt = torch.empty_like(wt)
        torch.ops.engine_kernels.ggml_interleave(wt, torch.from_numpy(blocks), type_id)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(rows, generator=gen)
    for path in ["float", *kernel_paths()]:  # the best path first ... "portable" last
        tol = FLOAT_PATH_TOL if path == "float" else INT8_PATH_TOL
        for m in (1, 3, 4, 7, 30):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, cols, generator=gen).to(dtype)
                out = torch.empty(m, rows, dtype=dtype)
                torch.ops.engine_kernels.ggml_linear(out, x, wt, type_id, bias.to(dtype),
                                                     PATHS[path][0], interleaved)
                ref = x.float() @ ref_w.T + bias.to(dtype).float()
                error = float((out.float() - ref).abs().max() / ref.abs().max())
                # bfloat16 out: its rounding (2^-8 relative) on top
                assert error <= tol + (0.01 if dtype == torch.bfloat16 else 0), (path, m, dtype, error)


def test_q8_0_values_of_minus_128_are_multiplied_right_on_every_path():
    """The gguf package's quantizer writes -127..127, a file may hold -128: the
    avx2 kernels multiply |w| (unsigned) by x with w's sign, where -128 must stay
    128, not wrap."""
    rows, cols = 32, 256
    blocks = _blocks("Q8_0", rows, cols, seed=9)
    values = blocks.reshape(rows, cols // 32, 34)[:, :, 2:].view(np.int8)
    values[:, :, ::3] = -128
    ref_w = _reference("Q8_0", blocks, (rows, cols))
    interleaved = torch.empty_like(torch.from_numpy(blocks))
    torch.ops.engine_kernels.ggml_interleave(interleaved, torch.from_numpy(blocks),
                                             GGML_TYPES["Q8_0"][0])
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(10))
    ref = x @ ref_w.T
    for path in ["float", *kernel_paths()]:
        for weight, layout in ((torch.from_numpy(blocks), False), (interleaved, True)):
            out = torch.empty(3, rows)
            torch.ops.engine_kernels.ggml_linear(out, x, weight, GGML_TYPES["Q8_0"][0], None,
                                                 PATHS[path][0], layout)
            error = float((out - ref).abs().max() / ref.abs().max())
            assert error <= (FLOAT_PATH_TOL if path == "float" else INT8_PATH_TOL), (path, layout)


# the int8 paths quantize x the same way and sum the same integers: they differ
# only in the order of their float32 sums (the avx512_vnni and avx2 paths take
# the K-quants a super-block at a time, the portable one a 32-value chunk at a time)
INT8_PATHS_AGREE_TOL = 1e-5


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q4_1"])
def test_every_int8_path_agrees_with_the_portable_one(qtype):
    rows, cols = 24, 1024
    blocks = torch.from_numpy(_blocks(qtype, rows, cols, seed=5))
    gen = torch.Generator().manual_seed(6)
    paths = kernel_paths()
    assert paths[-1] == "portable"
    for m in (1, 2, 3, 4, 5, 9):  # every rows-per-pass count, and passes after the first
        x = torch.randn(m, cols, generator=gen)
        outs = {}
        for path in paths:
            outs[path] = torch.empty(m, rows)
            torch.ops.engine_kernels.ggml_linear(outs[path], x, blocks, GGML_TYPES[qtype][0], None,
                                                 PATHS[path][0], False)
        ref = outs["portable"]
        for path, out in outs.items():
            error = float((out - ref).abs().max() / ref.abs().max())
            assert error <= INT8_PATHS_AGREE_TOL, (path, m, error)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_sized_products_run_tile_by_tile_and_equal_dequantize_then_matmul(qtype, dtype):
    # ggml_matmul: 40 weight rows in tiles of 16 (the last one partial), 60 rows of x
    # (more than MAX_INTERLEAVED_ROWS too)
    rows, cols, m = 40, 512, 60
    blocks = _blocks(qtype, rows, cols, seed=3)
    ref_w = _reference(qtype, blocks, (rows, cols)).to(dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(m, cols, generator=gen).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype)
    ref = torch.nn.functional.linear(x, ref_w, bias).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16 sums in another order
    out = torch.empty(m, rows, dtype=dtype)
    tile_bytes = 16 * cols * x.element_size()
    torch.ops.engine_kernels.ggml_matmul(out, x, torch.from_numpy(blocks), GGML_TYPES[qtype][0],
                                         bias, tile_bytes)
    assert float((out.float() - ref).abs().max() / ref.abs().max()) <= tol
    method = get_quantization_method(qtype.lower())  # more than MAX_KERNEL_ROWS rows: this op
    stored = method.pack(method.from_gguf(torch.from_numpy(blocks), (rows, cols)))
    through_method = method.linear(stored, x.reshape(3, 20, cols), bias).reshape(m, rows)
    assert float((through_method.float() - ref).abs().max() / ref.abs().max()) <= tol


def _kernels_called(fn) -> set[str]:
    """The engine_kernels operators `fn` runs, as torch's profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("engine_kernels::")}


def test_each_layout_leaves_the_block_kernel_at_its_own_row_limit():
    """The block kernel up to the row count where dequantize-then-matmul catches
    up, measured per layout: 48 rows for interleaved 32-value blocks (bfloat16 on
    the avx512_vnni and avx2 paths), 12 for K-quant super-blocks (bfloat16 on the
    avx512_vnni path), 16 otherwise: float32 activations included, even where
    they may be rounded to int8 (a prompt's rows keep the float tiles)."""
    from engine.quantization.ggml import MAX_INTERLEAVED_ROWS, MAX_K_SUPER_ROWS, MAX_KERNEL_ROWS

    best = kernel_paths()[0]
    for qtype in ("Q4_K", "Q4_1"):
        method = get_quantization_method(qtype.lower())
        blocks = torch.from_numpy(_blocks(qtype, 32, 512))
        weight = method.pack(method.from_gguf(blocks, (32, 512)))
        limit = (MAX_K_SUPER_ROWS if best == "avx512_vnni" and qtype == "Q4_K" else
                 MAX_INTERLEAVED_ROWS if best in ("avx512_vnni", "avx2") and qtype == "Q4_1"
                 else MAX_KERNEL_ROWS)
        for rows, op in ((limit, "ggml_linear"), (limit + 1, "ggml_matmul")):
            x = torch.randn(rows, 512).to(torch.bfloat16)
            assert _kernels_called(lambda m=method, w=weight, x=x: m.linear(w, x, None)) == {
                f"engine_kernels::{op}"}, (qtype, rows)
            run = method.fast_fn(weight, None, torch.bfloat16, 64)
            assert (run(x) is None) == (op == "ggml_matmul"), (qtype, rows)
        weight.quantized_activations = True
        for rows, op in ((MAX_KERNEL_ROWS, "ggml_linear"), (MAX_KERNEL_ROWS + 1, "ggml_matmul")):
            x = torch.randn(rows, 512)
            assert _kernels_called(lambda m=method, w=weight, x=x: m.linear(w, x, None)) == {
                f"engine_kernels::{op}"}, (qtype, rows, "float32")


def test_a_step_of_decode_rows_takes_float32_rows_to_the_block_kernel_as_lone_rows():
    """float32 activations that may be rounded take the block kernel past 16 rows
    only in a step of one row per sequence (`step_rows`), up to the interleaved
    layouts' limit, and each row comes out bit for bit as it does alone: a decoding
    sequence's numbers do not depend on how many others decode with it."""
    from engine.quantization import one_row_per_sequence, step_rows
    from engine.quantization.ggml import MAX_INTERLEAVED_ROWS, MAX_KERNEL_ROWS, interleaves

    limit = MAX_INTERLEAVED_ROWS if interleaves() else MAX_KERNEL_ROWS
    gen = torch.Generator().manual_seed(12)
    for qtype in ("Q4_1", "Q8_0"):
        method = get_quantization_method(qtype.lower())
        blocks = torch.from_numpy(_blocks(qtype, 48, 512, seed=13))
        weight = method.pack(method.from_gguf(blocks, (48, 512)))
        weight.quantized_activations = True
        x = torch.randn(limit + 1, 512, generator=gen)
        with step_rows(True):
            assert one_row_per_sequence()
            for rows, op in ((limit, "ggml_linear"), (limit + 1, "ggml_matmul")):
                assert _kernels_called(lambda m=method, w=weight, x=x[:rows]: m.linear(w, x, None)) \
                    == {f"engine_kernels::{op}"}, (qtype, rows)
            together = method.linear(weight, x[:limit], None)
            alone = torch.cat([method.linear(weight, x[i:i + 1], None) for i in range(limit)])
        assert not one_row_per_sequence()
        assert torch.equal(together, alone), qtype
        # a prompt step's rows past 16 keep the float tiles: other numbers
        prompt = method.linear(weight, x[:limit], None)
        assert _kernels_called(lambda m=method, w=weight, x=x[:limit]: m.linear(w, x, None)) == {
            "engine_kernels::ggml_matmul"}, qtype
        assert not torch.equal(prompt, together), qtype


def test_a_step_of_decode_rows_holds_for_the_thread_that_says_it():
    """Two engines stepping in two threads of one process each read their own
    step's flag."""
    import threading

    from engine.quantization import one_row_per_sequence, step_rows

    inside, done = threading.Event(), threading.Event()
    seen = []

    def other_engine():
        with step_rows(True):
            inside.set()
            done.wait(10)
            seen.append(one_row_per_sequence())

    thread = threading.Thread(target=other_engine)
    thread.start()
    assert inside.wait(10)
    assert not one_row_per_sequence()
    with step_rows(False):
        done.set()
        thread.join(10)
        assert not one_row_per_sequence()
    assert seen == [True]
    with step_rows(True):
        assert one_row_per_sequence()
        with step_rows(False):
            assert not one_row_per_sequence()
        assert one_row_per_sequence()
    assert not one_row_per_sequence()


def test_the_model_runner_says_when_a_step_is_decode_rows_only(k_llama, tmp_path, monkeypatch):
    """24 sequences decoding together in float32 chosen by auto: their steps'
    products take the block kernel with all 24 rows (the runner's `step_rows`),
    where the prompt steps take the float tiles."""
    from engine.quantization.ggml import interleaves

    path = _gguf(k_llama, tmp_path, "Q4_1")
    monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", "0")
    prompts = [[5 + i, 17, 300, 42] for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with LLM(str(path), dtype="auto", kv_cache_memory=1 << 22, max_num_seqs=24,
             enable_prefix_caching=False) as llm:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            llm.generate(prompts, params, use_tqdm=False)
    rows_by_op: dict[str, set[int]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in ("engine_kernels::ggml_linear", "engine_kernels::ggml_matmul"):
            rows_by_op.setdefault(event.key, set()).add(event.input_shapes[1][0])
    assert 96 in rows_by_op["engine_kernels::ggml_matmul"]  # the 24 prompts of 4 tokens
    linear_rows = rows_by_op["engine_kernels::ggml_linear"]
    assert (24 in linear_rows) == interleaves(), linear_rows  # the decode steps


def test_bf16_activations_take_the_best_int8_path(monkeypatch):
    method = get_quantization_method("q4_1")
    blocks = _blocks("Q4_1", 16, 256)
    stored = method.from_gguf(torch.from_numpy(blocks), (16, 256))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    ref = x.float() @ _reference("Q4_1", blocks, (16, 256)).T
    best = method.linear(stored, x, None)
    monkeypatch.setenv("ENGINE_QUANT_KERNEL_PATH", "portable")
    portable = method.linear(stored, x, None)
    for out in (best, portable):
        assert out.dtype == torch.bfloat16
        assert float((out.float() - ref).abs().max() / ref.abs().max()) <= INT8_PATH_TOL + 0.01
    monkeypatch.setenv("ENGINE_QUANT_KERNEL_PATH", "sse9")
    with pytest.raises(ValueError, match="ENGINE_QUANT_KERNEL_PATH='sse9'.*valid: float"):
        method.linear(stored, x, None)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_writers_round_trip_through_the_gguf_reader(qtype):
    values = np.random.default_rng(4).standard_normal((8, 512)).astype(np.float32)
    back = _reference(qtype, K_QUANTIZERS[qtype](values), values.shape).numpy()
    rel_rms = np.sqrt(((back - values) ** 2).mean() / (values ** 2).mean())
    assert rel_rms < {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03}[qtype]


# ---------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def k_llama(make_hf_model) -> Path:
    """Rows of 256 values (the K-quant block), tied embeddings like SmolLM2."""
    return make_hf_model("llama", hidden_size=256, intermediate_size=512,
                         tie_word_embeddings=True)


def _gguf(model: Path, folder: Path, qtype: str) -> Path:
    return write_gguf(model, folder / f"tiny-{qtype}.gguf", qtype,
                      k_blocks=K_QUANTIZERS.get(qtype))


def _stored_methods(llm: LLM) -> dict[str, list[str]]:
    return llm.llm_engine.quantized_layers()


def _teacher_forced(llm: LLM, sequence: list[int], start: int) -> list[int]:
    """The greedy next token after each prefix sequence[:i], i >= start."""
    params = SamplingParams(temperature=0, max_tokens=1)
    prompts = [sequence[:i] for i in range(start, len(sequence))]
    return [o.outputs[0].token_ids[0] for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("qtype", [
    "Q8_0", "Q4_1", "Q4_K",
    *(pytest.param(q, marks=pytest.mark.slow) for q in ("Q4_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")),
])
def test_gguf_stays_quantized_and_agrees_with_its_float32_dequantization(
        k_llama, tmp_path, monkeypatch, qtype):
    path = _gguf(k_llama, tmp_path, qtype)
    with LLM(str(path), dtype="float32", quantization="none", kv_cache_memory=1 << 22) as ref:
        params = SamplingParams(temperature=0, max_tokens=FORCED_TOKENS, ignore_eos=True)
        continuation = ref.generate([PROMPT_IDS], params)[0].outputs[0].token_ids
    sequence = PROMPT_IDS + list(continuation)
    # int8 activations in float32: what dtype="auto" runs on a CPU without bf16 arithmetic
    monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", "0")
    with LLM(str(path), dtype="auto", kv_cache_memory=1 << 22, max_num_seqs=4) as llm:
        layers = _stored_methods(llm)
        got = _teacher_forced(llm, sequence, len(PROMPT_IDS))
    assert layers["model.embed_tokens"] == [qtype.lower()]  # the embedding, tied LM head too
    assert layers["lm_head"] == [qtype.lower()]
    assert layers["model.layers.0.self_attn.qkv_proj"] == [qtype.lower()]
    assert len(layers) == 2 + 4 * 2  # qkv, o, gate_up, down per layer
    expected = sequence[len(PROMPT_IDS):]
    agree = sum(g == e for g, e in zip(got, expected, strict=True)) / len(expected)
    assert agree >= AGREEMENT[qtype], (qtype, agree)


def test_float32_chosen_by_auto_lets_the_kernels_quantize_activations(k_llama, tmp_path,
                                                                      monkeypatch):
    """On a CPU without bfloat16 arithmetic (ENGINE_CPU_NATIVE_BF16=0) dtype="auto"
    runs a GGUF model in float32 and its quantized products take the int8 path (x
    rounded to int8 per block, as llama.cpp does: several times faster there);
    dtype="float32" asks for full precision and keeps the float products."""
    path = _gguf(k_llama, tmp_path, "Q4_1")
    monkeypatch.setenv("ENGINE_CPU_NATIVE_BF16", "0")
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(11))
    outs = {}
    for dtype, rounded in (("auto", True), ("float32", False)):
        with LLM(str(path), dtype=dtype, kv_cache_memory=1 << 22) as llm:
            model = llm.llm_engine.executor.worker.model_runner.model
            weights = [rows for m in model.modules() if getattr(m, "quant_weight", None)
                       for _, rows in m.quant_weight.parts]
            assert {w.quantized_activations for w in weights} == {rounded}
            assert next(model.parameters()).dtype == torch.float32
            qkv = model.model.layers[0].self_attn.qkv_proj.quant_weight.parts[0][1]
            outs[dtype] = qkv.method.linear(qkv, x, None)
            want = x @ qkv.method.dequantize(qkv).T
    for dtype, tol in (("auto", INT8_PATH_TOL), ("float32", FLOAT_PATH_TOL)):
        error = float((outs[dtype] - want).abs().max() / want.abs().max())
        assert error <= tol, (dtype, error)
    assert not torch.equal(outs["auto"], outs["float32"])


@pytest.mark.parametrize("qtype", ["Q4_1", pytest.param("Q4_K", marks=pytest.mark.slow)])
def test_quantized_float32_path_equals_transformers_gguf_loading(k_llama, tmp_path, qtype):
    path = _gguf(k_llama, tmp_path, qtype)
    expected = transformers_greedy(path, PROMPT_IDS, 8)
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22) as llm:
        assert _stored_methods(llm)["lm_head"] == [qtype.lower()]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        assert llm.generate([PROMPT_IDS], params)[0].outputs[0].token_ids == expected


def _dequantized_copy(model: Path, method_name: str, out: Path) -> Path:
    """`model` with every 2-D weight replaced by dequantize(quantize(W)): the
    float32 model a quantized-at-load engine stands for."""
    method = get_quantization_method(method_name)
    shutil.copytree(model, out)
    state = load_file(str(model / "model.safetensors"))
    state = {k: method.dequantize(method.quantize(v)) if v.dim() == 2 else v
             for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("method", ["q8_0", pytest.param("q4_k", marks=pytest.mark.slow)])
def test_quantize_a_float_checkpoint_at_load(k_llama, tmp_path, monkeypatch, method):
    reference = _dequantized_copy(k_llama, method, tmp_path / "dequantized")
    with LLM(str(reference), dtype="float32", kv_cache_memory=1 << 22) as ref:
        params = SamplingParams(temperature=0, max_tokens=FORCED_TOKENS, ignore_eos=True)
        sequence = PROMPT_IDS + list(ref.generate([PROMPT_IDS], params)[0].outputs[0].token_ids)
    monkeypatch.setenv("ENGINE_QUANT_KERNEL_PATH", kernel_paths()[0])
    with LLM(str(k_llama), dtype="float32", quantization=method, kv_cache_memory=1 << 22,
             max_num_seqs=4) as llm:
        layers = _stored_methods(llm)
        got = _teacher_forced(llm, sequence, len(PROMPT_IDS))
    assert set(map(tuple, layers.values())) == {(method,)} and len(layers) == 10
    expected = sequence[len(PROMPT_IDS):]
    assert sum(g == e for g, e in zip(got, expected, strict=True)) / len(expected) >= 0.98


def test_an_unknown_quantization_names_the_valid_ones(small_llama_dir):
    with pytest.raises(ValueError, match=r"quantization 'q3_z' is not a quantization plugin. "
                                         r"Valid options are: none, .*q4_0.*q8_0"):
        LLM(str(small_llama_dir), quantization="q3_z")


@pytest.fixture(scope="module")
def small_llama_dir(make_hf_model) -> Path:
    return make_hf_model("llama")


def test_cli_generate_takes_quantization_and_plugins_list_shows_the_builtins(k_llama):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(k_llama), "--prompt", "hi",
         "--max-tokens", "3", "--temperature", "0", "--quantization", "q8_0", "--json"],
        env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "engine", "plugins", "list", "--group", "quantization", "--json"],
        env=subprocess_env(), capture_output=True, text=True, timeout=60)
    rows = json.loads(listing.stdout)
    builtins = {r["name"] for r in rows if r["source"] == "builtin"}
    assert builtins == {t.lower() for t in TYPES}


# ---------------------------------------------------------------------------- third party


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> Path:
    """The toy int8 quantization package, pip-installed into a --target folder."""
    root = tmp_path_factory.mktemp("toy-quant")
    source = root / "toy_quant_pkg"
    shutil.copytree(HERE / "plugin_fixtures" / "toy_quant_pkg", source)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
         str(source)], check=True, capture_output=True, text=True)
    return target


SERVE_SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
with LLM(sys.argv[1], dtype="float32", quantization="toy_int8", kv_cache_memory=1 << 22) as llm:
    layers = llm.llm_engine.quantized_layers()
    out = llm.generate([[5, 17, 300, 42]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
print(json.dumps({"layers": layers, "tokens": out[0].outputs[0].token_ids}))
"""


def test_a_third_party_method_serves_a_model_and_passes_the_kit(toy_site, small_llama_dir):
    env = subprocess_env(PYTHONPATH=str(toy_site), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(small_llama_dir)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(map(tuple, report["layers"].values())) == {("toy_int8",)}
    assert len(report["tokens"]) == 6
    kit = subprocess.run([sys.executable, "-m", "engine", "plugins", "test", "toy_int8", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert kit.returncode == 0, kit.stdout + kit.stderr
    outcomes = {r["check"]: r["outcome"] for r in json.loads(kit.stdout)}
    assert outcomes == {f"quantization/toy_int8::{name}": "passed" for name in (
        "is_subclass", "declarations", "round_trip", "linear_vs_dequantized",
        "embedding_vs_dequantized", "engine_run")}


def test_a_broken_third_party_method_fails_the_kit_naming_the_check(toy_site):
    env = subprocess_env(PYTHONPATH=str(toy_site), OMP_NUM_THREADS="1")
    kit = subprocess.run([sys.executable, "-m", "engine", "plugins", "test", "toy_int8_broken",
                          "-k", "not engine_run"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert kit.returncode == 1, kit.stdout + kit.stderr
    failed = [line for line in kit.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, kit.stdout
    assert failed[0].startswith("FAILED quantization/toy_int8_broken::linear_vs_dequantized: ")
    assert "off the dequantized float32 reference" in failed[0]
