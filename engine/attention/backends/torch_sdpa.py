"""TORCH_SDPA: attention through ``torch.nn.functional.scaled_dot_product_attention``.

Decoding sequences (one new token each) are batched into ONE call: their contexts
are gathered from the paged cache into a padded [B, L] batch with a padding mask,
and the query heads that share a KV head are folded into the query-length axis, so
grouped-query attention needs no copy of K/V. Prefills (whole prompts or chunks)
run one call per sequence: 4-D inputs reach the fused CPU kernel, and a prompt with
no cached context skips the cache read entirely (``is_causal``). Measured on 2 CPU
cores, that beats one call with a block-causal mask over all prefill tokens, whose
cost grows with the square of the step's total tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    causal_mask,
    context_slots,
    gather_kv,
    write_kv_cache,
)
from engine.attention.metadata import AttentionMetadata


@dataclass
class _Prefill:
    rows: slice  # the sequence's rows in the step
    slots: torch.Tensor | None  # [seq_len] cache slots, None when the context is all new
    mask: torch.Tensor | None  # [query_len, seq_len], None: plain causal


@dataclass
class _StepPlan:
    """What every layer of one step reuses: built once from the metadata."""

    all_decode: bool
    decode_rows: torch.Tensor | None  # [B] row of each decoding sequence
    decode_slots: torch.Tensor | None  # [B, L] cache slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where a key is real
    prefills: list[_Prefill]


def _plan(md: AttentionMetadata, has_cache: bool) -> _StepPlan:
    starts = md.query_start_loc.tolist()
    decode = [i for i, q in enumerate(md.query_lens) if q == 1] if has_cache else []
    prefills = []
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens, md.seq_lens, strict=True)):
        if has_cache and q_len == 1:
            continue
        rows = slice(starts[i], starts[i] + q_len)
        if q_len == seq_len:
            prefills.append(_Prefill(rows, None, None))
        elif not has_cache:
            raise ValueError("attention without a KV cache needs query_lens == seq_lens")
        else:
            slots = context_slots(md.block_tables[i], seq_len, md.block_size)
            prefills.append(_Prefill(rows, slots, causal_mask(q_len, seq_len, slots.device)))
    if not decode:
        return _StepPlan(False, None, None, None, prefills)
    index = torch.tensor(decode, dtype=torch.int64, device=md.block_tables.device)
    lens = md.seq_lens_tensor.index_select(0, index)
    max_len = max(md.seq_lens[i] for i in decode)
    slots = context_slots(md.block_tables.index_select(0, index), max_len, md.block_size)
    mask = torch.arange(max_len, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)
    return _StepPlan(
        all_decode=not prefills,
        decode_rows=md.query_start_loc.index_select(0, index),
        decode_slots=slots,
        decode_mask=mask.view(len(decode), 1, 1, max_len),
        prefills=prefills,
    )


class TorchSDPAImpl(AttentionImpl):
    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q = query.view(-1, self.num_heads, self.head_size)
        k = key.view(-1, self.num_kv_heads, self.head_size)
        v = value.view(-1, self.num_kv_heads, self.head_size)
        has_cache = kv_cache.numel() > 0
        plan = attn_metadata.backend_state.get("TORCH_SDPA")
        if plan is None:
            plan = attn_metadata.backend_state["TORCH_SDPA"] = _plan(attn_metadata, has_cache)
        if has_cache:
            write_kv_cache(kv_cache, k, v, attn_metadata.slot_mapping)

        if plan.all_decode:
            out = self._decode(q, kv_cache, plan)
        else:
            out = torch.empty_like(q)
            if plan.decode_rows is not None:
                out.index_copy_(0, plan.decode_rows,
                                self._decode(q.index_select(0, plan.decode_rows), kv_cache, plan))
            for p in plan.prefills:
                out[p.rows] = self._prefill(q[p.rows], k[p.rows], v[p.rows], kv_cache, p)
        return out.view(-1, self.num_heads * self.head_size)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
        """q [B, H, D] (one token per sequence) -> [B, H, D]."""
        batch = q.shape[0]
        keys, values = gather_kv(kv_cache, plan.decode_slots)  # [B, L, Hkv, D]
        # heads sharing a KV head become that head's "query length": GQA without a copy
        q = q.view(batch, self.num_kv_heads, self.num_queries_per_kv, self.head_size)
        out = F.scaled_dot_product_attention(
            q, keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=plan.decode_mask, scale=self.scale)
        return out.reshape(batch, self.num_heads, self.head_size)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, p: _Prefill) -> torch.Tensor:
        """q [Lq, H, D] and this step's k/v [Lq, Hkv, D] -> [Lq, H, D]."""
        if p.slots is not None:
            k, v = gather_kv(kv_cache, p.slots)  # the whole context [L, Hkv, D]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=p.mask, is_causal=p.mask is None,
            scale=self.scale, enable_gqa=self.num_queries_per_kv > 1)
        return out.squeeze(0).transpose(0, 1)


class TorchSDPABackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TorchSDPAImpl
