"""`Attention`: the attention layer models use; the platform picks its backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.attention.selector import AttentionSelectorConfig
from engine.config import get_current_engine_config
from engine.platforms import current_platform
from engine.utils import resolve_obj_by_qualname


def select_backend(selector: AttentionSelectorConfig) -> type[AttentionBackend]:
    """The backend class the current platform chooses for the current engine
    config's ``attention_backend`` (None: the platform's default)."""
    config = get_current_engine_config()
    selected = config.attention_backend if config is not None else None
    path = current_platform.get_attn_backend_cls(selected, selector)
    backend = resolve_obj_by_qualname(path)
    if not (isinstance(backend, type) and issubclass(backend, AttentionBackend)):
        raise TypeError(
            f"attention backend {path!r} is not an engine.attention.AttentionBackend subclass"
        )
    return backend


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache, for one layer.

    ``forward(query [T, H*D], key [T, Hkv*D], value [T, Hkv*D], attn_metadata)``
    -> [T, H*D]. Head counts are per tensor-parallel rank. `kv_cache` is bound by
    `bind_kv_cache` once the cache is allocated; until then the layer attends within
    the step only."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, prefix: str = "") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.scale = scale
        self.layer_name = prefix
        config = get_current_engine_config()
        self.backend = select_backend(AttentionSelectorConfig(
            head_size=head_size,
            num_heads=num_heads,
            num_kv_heads=self.num_kv_heads,
            dtype=torch.get_default_dtype(),
            block_size=config.cache_config.block_size if config is not None else 16,
        ))
        self.impl = self.backend.get_impl_cls()(num_heads, head_size, scale, self.num_kv_heads)
        # a plain attribute, not a buffer: the cache is not part of the model's state
        self.kv_cache = torch.empty(0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.impl.forward(self, query, key, value, self.kv_cache, attn_metadata)

    def fast_fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata],
                                    torch.Tensor | None] | None:
        """`forward` for a model's fast path (engine.ops.fast_path): the
        backend's `AttentionImpl.fast_fn`, when it has one."""
        return self.impl.fast_fn(self)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_size={self.head_size}, backend={self.backend.get_name()}")


def get_attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers, in layer order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def bind_kv_cache(model: nn.Module, kv_caches: list[torch.Tensor]) -> None:
    """Give each attention layer its KV cache tensor (one per layer, in layer
    order). Raises ValueError when the counts differ."""
    layers = get_attention_layers(model)
    if len(layers) != len(kv_caches):
        raise ValueError(f"the model has {len(layers)} attention layers but "
                         f"{len(kv_caches)} KV cache tensors were given")
    for layer, cache in zip(layers, kv_caches, strict=True):
        layer.kv_cache = cache
