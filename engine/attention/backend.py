"""The attention backend interface (docs/reference.md, "Other extension interfaces")
and helpers every backend shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from engine.kernels import usable_for

if TYPE_CHECKING:
    from engine.attention.metadata import AttentionMetadata


class AttentionImpl(ABC):
    """One layer's attention computation over the paged KV cache.

    `forward` receives the step's flattened projections ``query [T, H * D]``,
    ``key`` / ``value [T, Hkv * D]`` (RoPE already applied), writes the new key/value
    rows into `kv_cache` at ``attn_metadata.slot_mapping`` and returns ``[T, H * D]``:
    each token attending causally to its sequence's whole context. An empty
    `kv_cache` (none bound yet, e.g. a warm-up run) means attention within the step
    only, which requires ``query_lens == seq_lens``."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_queries_per_kv = self.num_heads // self.num_kv_heads

    @abstractmethod
    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Attention output [T, num_heads * head_size]."""

    def fast_fn(self, layer: torch.nn.Module) -> Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor | None] | None:
        """Optional: `forward` for a model's fast path (engine.ops.fast_path),
        bound once to `layer`: ``run(query, key, value, attn_metadata)`` must return
        exactly what ``forward(layer, query, key, value, layer.kv_cache,
        attn_metadata)`` would, or None having changed nothing (then `forward`
        runs). Read ``layer.kv_cache`` at every call (caches are rebound without
        rebuilding fast paths). By default None: `forward` is called."""
        return None


class AttentionBackend(ABC):
    """A family of attention kernels and the KV cache layout they read.

    The built-in layout is ``[2, num_blocks, block_size, num_kv_heads, head_size]``
    (keys then values); a backend may choose another one."""

    @staticmethod
    @abstractmethod
    def get_name() -> str:
        """The backend's name, as in `AttentionBackendEnum`."""

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]:
        """The `AttentionImpl` subclass each attention layer instantiates."""

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)


# --------------------------------------------------------------------------
# helpers for the built-in layout


def _rows_contiguous(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def write_kv_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the step's key/value rows [T, Hkv, D] at their slots (one compiled
    copy loop where engine.kernels is loaded, else two ``index_copy_``)."""
    if (key.dim() == 3 and value.dim() == 3 and kv_cache.is_contiguous()
            and _rows_contiguous(key) and _rows_contiguous(value)
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and usable_for(kv_cache, key, value)):
        torch.ops.engine_kernels.write_kv_cache(kv_cache, key, value, slot_mapping)
        return
    num_kv_heads, head_size = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, value)


def context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions ``0..length-1`` of the sequences in `block_table`
    ([max_blocks] or [B, max_blocks]) -> [length] or [B, length]."""
    positions = torch.arange(length, device=block_table.device)
    blocks = block_table.index_select(-1, positions // block_size)
    return blocks * block_size + positions % block_size


def gather_kv(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at `slots` ([L] or [B, L]) -> two tensors [..., L, Hkv, D]."""
    num_kv_heads, head_size = kv_cache.shape[-2:]
    flat = slots.reshape(-1)
    key = kv_cache[0].view(-1, num_kv_heads, head_size).index_select(0, flat)
    value = kv_cache[1].view(-1, num_kv_heads, head_size).index_select(0, flat)
    shape = (*slots.shape, num_kv_heads, head_size)
    return key.view(shape), value.view(shape)


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of whole cache blocks `block_ids` [N] -> two tensors
    [N * block_size, Hkv, D], in order. One copy of ``block_size`` rows per index
    is cheaper than `gather_kv`'s one per slot. `out` ([2, >= N, block_size, Hkv,
    D]) is reused when given: a fresh tensor of tens of MiB per layer would cost
    page faults on every step."""
    _, _, block_size, num_kv_heads, head_size = kv_cache.shape
    n = block_ids.numel()
    shape = (n * block_size, num_kv_heads, head_size)
    if out is None:
        key = kv_cache[0].index_select(0, block_ids)
        value = kv_cache[1].index_select(0, block_ids)
    else:
        key = torch.index_select(kv_cache[0], 0, block_ids, out=out[0, :n])
        value = torch.index_select(kv_cache[1], 0, block_ids, out=out[1, :n])
    return key.view(shape), value.view(shape)


def causal_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] bool: the queries are the last `query_len` positions."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)
    return torch.arange(seq_len, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)
