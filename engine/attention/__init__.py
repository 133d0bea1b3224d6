"""Attention: the backend interface, the built-in backends and the model layer.

Backends are named in `AttentionBackendEnum` (TORCH_SDPA, the default, and NAIVE,
the reference); `register_backend` adds or overrides one. Models use the
`Attention` layer, whose backend the current platform picks.

Importing this package imports no torch: platforms name backends through
`engine.attention.registry` and `engine.attention.selector` cheaply. The public
names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine._lazy import lazy_exports

# public name -> module that defines it (imported lazily, see __getattr__)
_LAZY = {
    "Attention": "engine.attention.layer",
    "AttentionBackend": "engine.attention.backend",
    "AttentionBackendEnum": "engine.attention.registry",
    "AttentionImpl": "engine.attention.backend",
    "AttentionMetadata": "engine.attention.metadata",
    "AttentionSelectorConfig": "engine.attention.selector",
    "bind_kv_cache": "engine.attention.layer",
    "get_attention_layers": "engine.attention.layer",
    "register_backend": "engine.attention.registry",
}

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

if TYPE_CHECKING:  # pragma: no cover
    from engine.attention.backend import AttentionBackend, AttentionImpl
    from engine.attention.layer import Attention, bind_kv_cache, get_attention_layers
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.registry import AttentionBackendEnum, register_backend
    from engine.attention.selector import AttentionSelectorConfig

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

