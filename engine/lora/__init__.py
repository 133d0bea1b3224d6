"""LoRA adapters: many fine-tunes of one base model served from one engine.

`LoRARequest` names an adapter folder in PEFT's format; `LLM(enable_lora=True)`
turns the machinery on (`LoRAConfig`); each request may name its adapter and
one step mixes requests of several adapters and of the base model. See
docs/lora.md.

The names load on first use: `engine plugins list` imports
`engine.lora.resolver` (the built-in resolver's settings) and must not pay for
torch, which the adapter code imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine._lazy import lazy_exports

_LAZY = {
    "LoRAAdapterError": "engine.lora.adapter",
    "LoRAConfig": "engine.lora.config",
    "LoRARequest": "engine.lora.request",
}

__all__ = ["LoRAAdapterError", "LoRAConfig", "LoRARequest"]

if TYPE_CHECKING:  # pragma: no cover
    from engine.lora.adapter import LoRAAdapterError
    from engine.lora.config import LoRAConfig
    from engine.lora.request import LoRARequest

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
