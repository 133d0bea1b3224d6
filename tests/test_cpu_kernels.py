"""The compiled CPU kernels (engine.kernels): the paged decode-attention op
against the naive backend, and greedy float32 generation through it against
transformers. Building the library takes a minute (once per machine: cached)."""

from __future__ import annotations

import random

import pytest
import torch
from attention_steps import random_attention_step

import engine.kernels as kernels
from engine.attention.backends import torch_sdpa
from engine.attention.backends.naive import NaiveAttentionImpl
from engine.attention.backends.torch_sdpa import TorchSDPAImpl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def compiled():
    """The kernels loaded in this process (built first when missing)."""
    saved = kernels._loaded
    if not kernels.library_path().exists():
        kernels.build()
    kernels._loaded = None
    mp = pytest.MonkeyPatch()
    mp.setenv(kernels.MODE_ENV, "build")
    assert kernels.kernels_available()
    yield
    mp.undo()
    kernels._loaded = saved


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
def test_greedy_float32_through_the_kernel_equals_transformers(compiled, make_hf_model):
    import transformers

    from engine import LLM, SamplingParams

    model_dir = make_hf_model("llama")
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
