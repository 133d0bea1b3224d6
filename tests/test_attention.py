"""Attention backends over the paged KV cache, the backend enum and the layer."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.attention import (
    Attention,
    AttentionBackend,
    AttentionBackendEnum,
    AttentionMetadata,
    bind_kv_cache,
    get_attention_layers,
    register_backend,
)
from engine.attention.backends.naive import NaiveAttentionBackend, NaiveAttentionImpl
from engine.attention.backends.torch_sdpa import TorchSDPABackend
from engine.config import EngineConfig, ModelConfig, set_current_engine_config

pytestmark = pytest.mark.usefixtures("attention_backends_restored")


def _mixed_step(block_size=4, num_blocks=40, heads=4, kv_heads=2, head_size=8, seed=0):
    """A step with a decode, a chunk after cached context, a fresh prompt and a
    one-token prompt, over a cache whose earlier context is already filled."""
    gen = torch.Generator().manual_seed(seed)
    query_lens = [1, 5, 7, 1]
    seq_lens = [10, 12, 7, 1]
    free = list(range(num_blocks - 1, 0, -1))
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    slots = []
    for q, s, table in zip(query_lens, seq_lens, tables, strict=True):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
    md = AttentionMetadata.build(query_lens, seq_lens, tables, slots, block_size)
    cache = torch.randn(TorchSDPABackend.get_kv_cache_shape(num_blocks, block_size, kv_heads,
                                                            head_size), generator=gen)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads * head_size, generator=gen)
    k = torch.randn(tokens, kv_heads * head_size, generator=gen)
    v = torch.randn(tokens, kv_heads * head_size, generator=gen)
    return md, cache, q, k, v


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_and_naive_backends_agree_on_a_mixed_step(kv_heads):
    md, cache, q, k, v = _mixed_step(kv_heads=kv_heads)
    sdpa = TorchSDPABackend.get_impl_cls()(4, 8, 8**-0.5, kv_heads)
    naive = NaiveAttentionBackend.get_impl_cls()(4, 8, 8**-0.5, kv_heads)
    cache_a, cache_b = cache.clone(), cache.clone()
    out_a = sdpa.forward(None, q, k, v, cache_a, md)
    out_b = naive.forward(None, q, k, v, cache_b, md)
    assert out_a.shape == (sum(md.query_lens), 4 * 8)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache_a, cache_b)


def test_new_keys_and_values_are_written_at_their_slots():
    md, cache, q, k, v = _mixed_step()
    TorchSDPABackend.get_impl_cls()(4, 8, 1.0, 2).forward(None, q, k, v, cache, md)
    flat_k = cache[0].view(-1, 2, 8)
    flat_v = cache[1].view(-1, 2, 8)
    assert torch.equal(flat_k[md.slot_mapping], k.view(-1, 2, 8))
    assert torch.equal(flat_v[md.slot_mapping], v.view(-1, 2, 8))


def test_all_decode_step_matches_per_sequence_reference():
    block_size, heads, kv_heads, d = 4, 4, 2, 8
    gen = torch.Generator().manual_seed(5)
    seq_lens = [3, 9, 16, 1]
    tables = [[1], [2, 3, 4], [5, 6, 7, 8], [9]]
    slots = [t[(s - 1) // block_size] * block_size + (s - 1) % block_size
             for s, t in zip(seq_lens, tables, strict=True)]
    md = AttentionMetadata.build([1] * 4, seq_lens, tables, slots, block_size)
    cache = torch.randn(2, 10, block_size, kv_heads, d, generator=gen)
    q = torch.randn(4, heads * d, generator=gen)
    k = torch.randn(4, kv_heads * d, generator=gen)
    v = torch.randn(4, kv_heads * d, generator=gen)
    out = TorchSDPABackend.get_impl_cls()(heads, d, 0.3, kv_heads).forward(
        None, q, k, v, cache.clone(), md)
    ref = NaiveAttentionImpl(heads, d, 0.3, kv_heads).forward(None, q, k, v, cache.clone(), md)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_metadata_build_checks_its_lists():
    md = AttentionMetadata.build([2, 1], [2, 5], [[3], [4, 7]], [12, 13, 28], 4)
    assert md.query_start_loc.tolist() == [0, 2, 3]
    assert md.block_tables.tolist() == [[3, 0], [4, 7]]
    assert (md.max_query_len, md.max_seq_len, md.num_tokens) == (2, 5, 3)
    with pytest.raises(ValueError, match="slot_mapping"):
        AttentionMetadata.build([2], [2], [[1]], [4], 4)
    with pytest.raises(ValueError, match="sequence 0"):
        AttentionMetadata.build([2], [9], [[1]], [4, 5], 4)


def test_backend_enum_names_builtins_and_rejects_unknown_names():
    assert AttentionBackendEnum["TORCH_SDPA"] is AttentionBackendEnum.TORCH_SDPA
    assert AttentionBackendEnum["naive"].get_class() is NaiveAttentionBackend
    assert AttentionBackendEnum.TORCH_SDPA.get_class() is TorchSDPABackend
    assert [m.name for m in AttentionBackendEnum][:2] == ["TORCH_SDPA", "NAIVE"]
    assert "NAIVE" in AttentionBackendEnum
    with pytest.raises(ValueError, match="Unknown attention backend: 'FLASH'.*TORCH_SDPA, NAIVE"):
        AttentionBackendEnum["FLASH"]
    assert pickle.loads(pickle.dumps(AttentionBackendEnum.NAIVE)) is AttentionBackendEnum.NAIVE


class ScaledNaiveBackend(NaiveAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "MY_ATTN"


def test_register_backend_as_call_and_as_decorator_and_override():
    member = register_backend("MY_ATTN", f"{__name__}.ScaledNaiveBackend")
    assert AttentionBackendEnum["MY_ATTN"] is member is AttentionBackendEnum.MY_ATTN
    assert member.get_class() is ScaledNaiveBackend

    @register_backend("DECORATED")
    class Decorated(NaiveAttentionBackend):
        pass

    assert AttentionBackendEnum["DECORATED"].get_path().endswith("Decorated")
    register_backend("TORCH_SDPA", f"{__name__}.ScaledNaiveBackend")
    assert AttentionBackendEnum.TORCH_SDPA.get_class() is ScaledNaiveBackend
    with pytest.raises(ValueError, match="attention backend name"):
        register_backend("bad name", "x.y")


def _config(backend=None):
    return EngineConfig(ModelConfig(model="unused"), attention_backend=backend)


def test_attention_layer_uses_the_configured_backend_and_binds_its_cache():
    register_backend("MY_ATTN", f"{__name__}.ScaledNaiveBackend")
    with set_current_engine_config(_config("MY_ATTN")):
        model = torch.nn.Sequential(Attention(4, 8, 0.5, 2, prefix="l0"),
                                    Attention(4, 8, 0.5, 2, prefix="l1"))
    with set_current_engine_config(_config()):
        default = Attention(4, 8, 0.5, 2)
    assert default.backend is TorchSDPABackend
    layers = get_attention_layers(model)
    assert [layer.layer_name for layer in layers] == ["l0", "l1"]
    assert all(layer.backend is ScaledNaiveBackend for layer in layers)
    caches = [torch.zeros(2, 3, 4, 2, 8), torch.zeros(2, 3, 4, 2, 8)]
    bind_kv_cache(model, caches)
    assert layers[1].kv_cache is caches[1]
    with pytest.raises(ValueError, match="2 attention layers but 1"):
        bind_kv_cache(model, caches[:1])


def test_unknown_configured_backend_fails_at_layer_construction():
    with set_current_engine_config(_config("NOPE")), \
            pytest.raises(ValueError, match="Valid options are: .*TORCH_SDPA"):
        Attention(4, 8, 0.5, 2)


def test_backend_interface_is_abstract():
    with pytest.raises(TypeError):
        AttentionBackend()
