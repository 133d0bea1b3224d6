"""LoRA adapters: many fine-tunes of one base model served from one engine.

`LoRARequest` names an adapter folder in PEFT's format; `LLM(enable_lora=True)`
turns the machinery on (`LoRAConfig`); each request may name its adapter and
one step mixes requests of several adapters and of the base model. See
docs/lora.md.
"""

from engine.lora.adapter import LoRAAdapterError
from engine.lora.config import LoRAConfig
from engine.lora.request import LoRARequest

__all__ = ["LoRAAdapterError", "LoRAConfig", "LoRARequest"]
