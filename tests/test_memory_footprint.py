"""What an engine process holds: a GGUF model's weights at their quantized size,
a KV cache resident only where written, the GGUF parse dropped once loaded, and
freed heap memory handed back (benchmarks/profile_memory.py measures the whole
process, docs/memory.md)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from test_gguf import write_gguf
from test_prefill_path import _mapping_of

from engine import LLM
from engine.model_loader import gguf as gguf_module
from engine.model_loader.gguf import GGUFFile

pytestmark = pytest.mark.usefixtures("compiled")  # the quantized kernels keep the blocks


@pytest.fixture(scope="module")
def tied_llama(make_hf_model) -> Path:
    """Rows of 256 values, tied embeddings like SmolLM2 (LM head = the table)."""
    return make_hf_model("llama", hidden_size=256, intermediate_size=512,
                         tie_word_embeddings=True)


def _held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every storage the model's modules hold (parameters, buffers,
    tensor attributes such as prepacked weights, quantized weights), each
    storage once, by kind; the KV cache apart."""
    seen: set[int] = set()
    held = {"weights": 0, "kv_cache": 0}

    def add(t: torch.Tensor, kind: str) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return
        seen.add(storage.data_ptr())
        held[kind] += storage.nbytes()

    for module in model.modules():
        for name, value in vars(module).items():
            if name == "kv_cache" and isinstance(value, torch.Tensor):
                add(value, "kv_cache")
            elif isinstance(value, torch.Tensor):
                add(value, "weights")
            elif isinstance(value, dict):  # _parameters, _buffers
                for t in value.values():
                    if isinstance(t, torch.Tensor):
                        add(t, "weights")
        quant = getattr(module, "quant_weight", None)
        if quant is not None:
            for _, rows in quant.parts:
                for t in rows.tensors.values():
                    add(t, "weights")
    return held


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_a_gguf_model_holds_its_weights_at_their_quantized_size(tied_llama, tmp_path, qtype):
    path = write_gguf(tied_llama, tmp_path / f"tiny-{qtype}.gguf", qtype)
    file_bytes = GGUFFile(path).nbytes  # blocks, plus the F32 norms
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22, max_model_len=256) as llm:
        model = llm.llm_engine.executor.worker.model_runner.model
        held = _held_bytes(model)
        assert len(llm.llm_engine.quantized_layers()) == 2 + 4 * 2
    cfg = json.loads((tied_llama / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rotary = 256 * head_dim * 4 * 2  # cos and sin tables, float32, max_model_len rows
    # the file's bytes, the rotary tables and a few float placeholders: no
    # float copy of any quantized weight (the float32 table alone would be 1 MiB)
    assert file_bytes <= held["weights"] <= file_bytes + rotary + 4096, (held, file_bytes)


def test_the_kv_cache_is_resident_only_where_written(tied_llama, tmp_path):
    from engine.attention import get_attention_layers

    path = write_gguf(tied_llama, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    # freed, never-touched heap memory first: glibc serves smaller blocks from
    # it (calloc then zeroes, and makes resident, every page)
    holes = [torch.empty(1 << 20, dtype=torch.uint8) for _ in range(64)]
    del holes
    cache_bytes = 64 << 20
    with LLM(str(path), dtype="float32", kv_cache_memory=cache_bytes,
             kv_prefault="ahead") as llm:  # warm-up on
        model = llm.llm_engine.executor.worker.model_runner.model
        caches = [layer.kv_cache for layer in get_attention_layers(model)]
        maps = [_mapping_of(c.data_ptr()) for c in caches]  # smaps fields, "N kB"
        per_layer = caches[0].numel() * caches[0].element_size()
        # zeros where the warm-up did not write (read after the maps were measured)
        assert all(int((c != 0).sum()) < c.numel() // 4 for c in caches)
    for m in maps:  # each layer's cache is its own map, resident only where written
        assert int(m["Size"].split()[0]) * 1024 >= per_layer
        # the warm-up writes the few blocks its sequences share (far below 1/4)
        assert int(m["Rss"].split()[0]) * 1024 < per_layer // 4, (m, per_layer)


def test_the_gguf_parse_is_dropped_once_the_weights_are_read(tied_llama, tmp_path):
    path = write_gguf(tied_llama, tmp_path / "tiny-Q4_1.gguf", "Q4_1")
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22) as llm:
        gc.collect()
        assert gguf_module._open_cached.cache_info().currsize == 0
        assert not [o for o in gc.get_objects() if type(o) is GGUFFile]
        # the tokenizer, built from the parse before, still works
        assert llm.get_tokenizer().decode(llm.get_tokenizer().encode("def add(a, b):"))


TRIM_CHILD = r"""
import ctypes, json
from engine.worker.sleep import release_freed_memory

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
# 96 MiB in heap-sized pieces, written, then freed but for the last one: the
# freed memory sits below the top of the heap, where free() does not trim
blocks = [libc.malloc(64 << 10) for _ in range(1536)]
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
for b in blocks[:-1]:
    libc.free(b)
before = rss_kb()
release_freed_memory(collect_garbage=False)
print(json.dumps({"before_kb": before, "after_kb": rss_kb()}))
"""


def test_release_freed_memory_hands_freed_heap_pages_back():
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["before_kb"] - report["after_kb"] > 64 << 10, report  # of the 96 MiB freed



def test_prompt_sized_quantized_products_see_a_few_row_counts():
    from engine.quantization import QuantizedWeight
    from engine.quantization.ggml import Q8_0
    from engine.utils import shape_bucket

    class RowCounting(Q8_0):
        """The built-in Q8_0, noting the row counts its linear is given."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def linear(self, weight, x, bias):
            self.rows.append(x.shape[0])
            return super().linear(weight, x, bias)

    method = RowCounting()
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(48, 256, generator=gen), torch.randn(48, generator=gen)
    qw = QuantizedWeight((48, 256))
    qw.add(0, method.quantize(w))
    qw.finish("w")
    reference_w = qw.dequantize()
    lengths = [1, 5, 16, 17, 37, 100, 257, 300]
    for n in lengths:
        x = torch.randn(n, 256, generator=gen)
        out = qw.linear(x, bias)
        ref = x @ reference_w.T + bias
        assert out.shape == (n, 48)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5, n
    # oneDNN keeps a kernel (and its packed-weight scratch) per row count: prompt
    # lengths reach it as a few dozen buckets, decode-sized inputs as they are
    assert method.rows == [n if n <= 16 else shape_bucket(n) for n in lengths]
    assert method.rows[-3:] == [104, 288, 320]
