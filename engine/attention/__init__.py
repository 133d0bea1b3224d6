"""Attention: the backend interface, the built-in backends and the model layer.

Backends are named in `AttentionBackendEnum` (TORCH_SDPA, the default, and NAIVE,
the reference); `register_backend` adds or overrides one. Models use the
`Attention` layer, whose backend the current platform picks.
"""

from engine.attention.backend import AttentionBackend, AttentionImpl
from engine.attention.layer import (
    Attention,
    AttentionSelectorConfig,
    bind_kv_cache,
    get_attention_layers,
)
from engine.attention.metadata import AttentionMetadata
from engine.attention.registry import AttentionBackendEnum, register_backend

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionImpl",
    "AttentionMetadata",
    "AttentionSelectorConfig",
    "bind_kv_cache",
    "get_attention_layers",
    "register_backend",
]
