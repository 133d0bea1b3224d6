"""NAIVE: explicit ``softmax(Q K^T * scale) V`` per sequence, the reference backend."""

from __future__ import annotations

import torch

from engine.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    causal_mask,
    context_slots,
    gather_kv,
    write_kv_cache,
)
from engine.attention.metadata import AttentionMetadata


class NaiveAttentionImpl(AttentionImpl):
    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        md = attn_metadata
        q = query.view(-1, self.num_heads, self.head_size)
        k = key.view(-1, self.num_kv_heads, self.head_size)
        v = value.view(-1, self.num_kv_heads, self.head_size)
        has_cache = kv_cache.numel() > 0
        if has_cache:
            write_kv_cache(kv_cache, k, v, md.slot_mapping)
        out = torch.empty_like(q)
        starts = md.query_start_loc.tolist()
        for i, (q_len, seq_len) in enumerate(zip(md.query_lens, md.seq_lens, strict=True)):
            rows = slice(starts[i], starts[i] + q_len)
            if has_cache:
                slots = context_slots(md.block_tables[i], seq_len, md.block_size)
                seq_k, seq_v = gather_kv(kv_cache, slots)
            elif q_len == seq_len:
                seq_k, seq_v = k[rows], v[rows]
            else:
                raise ValueError("attention without a KV cache needs query_lens == seq_lens")
            out[rows] = self._attend(q[rows], seq_k, seq_v)
        return out.view(-1, self.num_heads * self.head_size)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [Lq, H, D], k/v [L, Hkv, D] -> [Lq, H, D]."""
        k = k.repeat_interleave(self.num_queries_per_kv, dim=1)
        v = v.repeat_interleave(self.num_queries_per_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * self.scale
        mask = causal_mask(q.shape[0], k.shape[0], q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


class NaiveAttentionBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "NAIVE"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return NaiveAttentionImpl
