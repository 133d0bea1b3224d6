"""One attention step's inputs for backend tests: metadata over shuffled cache
blocks (so block tables are not the identity), a filled cache and the step's q/k/v."""

from __future__ import annotations

import random

import torch

from engine.attention import AttentionMetadata


def random_attention_step(query_lens, seq_lens, dtype=torch.float32, block_size=4, kv_heads=2,
                          heads=4, head_size=8, seed=0):
    """Returns ``(metadata, kv_cache, [q, k, v])`` for sequences of `seq_lens` tokens
    whose last `query_lens` tokens are computed this step."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 1
    free = list(range(1, num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    slots = [table[p // block_size] * block_size + p % block_size
             for q, s, table in zip(query_lens, seq_lens, tables, strict=True)
             for p in range(s - q, s)]
    md = AttentionMetadata.build(query_lens, seq_lens, tables, slots, block_size)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
    tokens = sum(query_lens)
    qkv = [torch.randn(tokens, n * head_size, generator=gen).to(dtype)
           for n in (heads, kv_heads, kv_heads)]
    return md, cache, qkv
