"""Model architectures and `ModelRegistry`.

In-tree models are registered by `register_builtin_models`, which the built-in
manifest's general plugin calls: the same path a third-party model plugin takes.
Importing this package does not import torch.
"""

from __future__ import annotations

from engine.models.registry import ModelRegistry

# architecture name (config.json) -> lazy "module:Class"
_BUILTIN_MODELS = {
    "LlamaForCausalLM": "engine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "engine.models.llama:LlamaForCausalLM",
    "BertModel": "engine.models.bert:BertModel",
}


def register_builtin_models() -> None:
    """Register the in-tree architectures lazily. Re-entrant, and never replaces
    an architecture that a plugin registered first."""
    for arch, value in _BUILTIN_MODELS.items():
        if not ModelRegistry.is_registered(arch):
            ModelRegistry.register_model(arch, value)


__all__ = ["ModelRegistry", "register_builtin_models"]
