"""LlamaForCausalLM (Llama / Qwen2 / Mistral configs) against transformers' logits,
through the paged KV cache: prefill, decode steps, batches of different lengths,
chunked prefill and a shared (prefix-cached) context, on both attention backends."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.attention import AttentionMetadata, bind_kv_cache, get_attention_layers
from engine.config import EngineConfig, ModelConfig
from engine.model_loader import load_model
from engine.models import register_builtin_models

BACKENDS = ["TORCH_SDPA", "NAIVE"]
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _setup():
    torch.set_num_threads(1)
    register_builtin_models()


class PagedRunner:
    """A minimal model runner: one block table per sequence (blocks handed out in
    reverse order so tables are not trivially contiguous), metadata built by hand."""

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64) -> None:
        self.model = model
        self.block_size = block_size
        caches = [torch.zeros(layer.backend.get_kv_cache_shape(
            num_blocks, block_size, layer.num_kv_heads, layer.head_size))
            for layer in get_attention_layers(model)]
        bind_kv_cache(model, caches)
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 stays padding
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}

    def share_prefix(self, src: str, dst: str, num_blocks: int) -> None:
        """`dst` starts with `src`'s first full blocks (a prefix-cache hit)."""
        self.tables[dst] = self.tables[src][:num_blocks]
        self.tokens[dst] = self.tokens[src][: num_blocks * self.block_size]

    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Feed each sequence's new tokens; return each one's logits for its new
        positions [len(chunk), vocab]."""
        input_ids, positions, slots, qlens, slens, tables = [], [], [], [], [], []
        for sid, new in chunks.items():
            table = self.tables.setdefault(sid, [])
            done = self.tokens.setdefault(sid, [])
            start, end = len(done), len(done) + len(new)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for pos in range(start, end):
                slots.append(table[pos // self.block_size] * self.block_size
                             + pos % self.block_size)
            input_ids += new
            positions += range(start, end)
            qlens.append(len(new))
            slens.append(end)
            tables.append(list(table))
            done.extend(new)
        md = AttentionMetadata.build(qlens, slens, tables, slots, self.block_size, "cpu")
        with torch.inference_mode():
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), md)
            logits = self.model.compute_logits(hidden)
        return dict(zip(chunks, logits.split(qlens), strict=True))


_HF_CACHE: dict = {}


def hf_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    import transformers

    if model_dir not in _HF_CACHE:
        _HF_CACHE[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return _HF_CACHE[model_dir](torch.tensor([token_ids])).logits[0]


def engine_model(model_dir, backend: str):
    return load_model(EngineConfig(ModelConfig(model=str(model_dir), dtype="float32"),
                                   attention_backend=backend))


def _with_config(model_dir, tmp_path, **changes):
    """A copy of `model_dir` whose config.json has `changes` (same weights)."""
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


VARIANTS = {
    "llama": ("llama", {}, {}),
    "qwen2": ("qwen2", {}, {}),
    "mistral": ("mistral", {}, {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, {}),
    "mistral-head-dim": ("mistral", {"head_dim": 32}, {}),
    "llama-rope-llama3": ("llama", {}, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    "llama-rope-linear": ("llama", {}, {"rope_scaling": {"type": "linear", "factor": 2.0}}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_dir(request, make_hf_model, tmp_path_factory):
    arch, overrides, config_changes = VARIANTS[request.param]
    model_dir = make_hf_model(arch, **overrides)
    if config_changes:
        model_dir = _with_config(model_dir, tmp_path_factory.mktemp(request.param), **config_changes)
    return model_dir


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode_matches_transformers_for_a_two_sequence_batch(variant_dir, backend):
    model = engine_model(variant_dir, backend)
    runner = PagedRunner(model)
    gen = torch.Generator().manual_seed(1)
    prompts = {"a": torch.randint(3, 1024, (11,), generator=gen).tolist(),
               "b": torch.randint(3, 1024, (5,), generator=gen).tolist()}
    out = runner.step(prompts)
    for sid, prompt in prompts.items():
        torch.testing.assert_close(out[sid], hf_logits(variant_dir, prompt), atol=ATOL, rtol=0)
    seqs = {sid: list(p) for sid, p in prompts.items()}
    for _ in range(3):  # decode: each sequence feeds its greedy token
        new = {sid: [int(out[sid][-1].argmax())] for sid in seqs}
        out = runner.step(new)
        for sid in seqs:
            seqs[sid] += new[sid]
            torch.testing.assert_close(out[sid][-1], hf_logits(variant_dir, seqs[sid])[-1],
                                       atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_in_two_chunks_gives_the_same_logits_as_one_prefill(make_hf_model, backend):
    model_dir = make_hf_model("qwen2")
    model = engine_model(model_dir, backend)
    prompt = torch.randint(3, 1024, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    whole = PagedRunner(model).step({"s": prompt})["s"]
    runner = PagedRunner(model)
    first = runner.step({"s": prompt[:6]})["s"]
    # the second chunk shares its step with another sequence's prefill
    second = runner.step({"s": prompt[6:], "other": prompt[:3]})["s"]
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(whole, hf_logits(model_dir, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_reusing_cached_prefix_blocks_matches_a_full_prefill(make_hf_model, backend):
    model_dir = make_hf_model("llama")
    model = engine_model(model_dir, backend)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 1024, (8,), generator=gen).tolist()  # two full blocks of 4
    runner = PagedRunner(model)
    runner.step({"first": prefix + [5, 6, 7]})
    runner.share_prefix("first", "second", num_blocks=2)
    tail = torch.randint(3, 1024, (5,), generator=gen).tolist()
    # only the tail is computed, alongside a decode of the first sequence
    out = runner.step({"second": tail, "first": [9]})
    torch.testing.assert_close(out["second"], hf_logits(model_dir, prefix + tail)[8:],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(out["first"][-1], hf_logits(model_dir, prefix + [5, 6, 7, 9])[-1],
                               atol=ATOL, rtol=0)


def test_without_a_bound_cache_the_model_attends_within_the_step(make_hf_model):
    model_dir = make_hf_model("llama")
    model = engine_model(model_dir, "TORCH_SDPA")
    prompt = list(range(3, 12))
    md = AttentionMetadata.build([9], [9], [[0, 0, 0]], [0] * 9, 4)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(prompt), torch.arange(9), md))
    torch.testing.assert_close(logits, hf_logits(model_dir, prompt), atol=ATOL, rtol=0)


def test_fused_projections_hold_the_checkpoint_tensors(make_hf_model):
    from safetensors.torch import load_file

    model_dir = make_hf_model("qwen2")
    model = engine_model(model_dir, "TORCH_SDPA")
    ckpt = load_file(str(model_dir / "model.safetensors"))
    attn = model.model.layers[1].self_attn
    expected = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, expected)
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None  # Qwen2: bias on q/k/v only
