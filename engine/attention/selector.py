"""What a platform sees when it picks an attention backend, and the default
choice. Free of torch: `engine.platforms` imports it, and the attention layer
(which imports the platform) asks the platform with it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.attention.registry import AttentionBackendEnum

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_ATTENTION_BACKEND = "TORCH_SDPA"
ATTENTION_BACKEND_ENV = "ENGINE_ATTENTION_BACKEND"


@dataclass(frozen=True)
class AttentionSelectorConfig:
    """What a platform may look at when it picks an attention backend."""

    head_size: int
    num_heads: int
    num_kv_heads: int
    dtype: torch.dtype
    block_size: int


def attention_backend_path(selected_backend: str | None) -> str:
    """Resolve a backend name (user's, else `ENGINE_ATTENTION_BACKEND`, else
    TORCH_SDPA) to the backend's qualified class name."""
    name = selected_backend or os.environ.get(ATTENTION_BACKEND_ENV) or DEFAULT_ATTENTION_BACKEND
    # an unknown name raises ValueError listing the valid ones
    return AttentionBackendEnum[name.strip()].get_path()
