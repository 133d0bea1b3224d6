"""engine: an LLM inference engine whose every extension point is a plugin.

Importing this package is cheap: it imports neither torch nor any plugin and
resolves no platform. The public names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine._lazy import lazy_exports
from engine._openmp import choose_openmp_wait_policy
from registry import __version__

# before anything can import torch: libgomp reads its wait policy once, when torch loads it
choose_openmp_wait_policy()

# public name -> module that defines it (imported lazily, see __getattr__)
_LAZY = {
    "LLM": "engine.llm",
    "LoRARequest": "engine.lora",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "EmbeddingRequestOutput": "engine.outputs",
    "ModelRegistry": "engine.models.registry",
    "set_random_seed": "engine.utils",
}

__all__ = [
    "__version__",
    "LLM",
    "LoRARequest",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "ModelRegistry",
    "set_random_seed",
]

if TYPE_CHECKING:  # pragma: no cover
    from engine.llm import LLM
    from engine.lora import LoRARequest
    from engine.models.registry import ModelRegistry
    from engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
    from engine.sampling_params import SamplingParams, StructuredOutputsParams
    from engine.utils import set_random_seed

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

