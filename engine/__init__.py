"""engine: an LLM inference engine whose every extension point is a plugin.

Importing this package is cheap: it imports neither torch nor any plugin and
resolves no platform. The public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from registry._version import __version__

# OpenMP threads that wait for work by sleeping, not spinning: on a CPU shared with
# other processes a spinning thread takes the core its straggling partner needs, and
# a decode step is hundreds of parallel regions (docs/benchmarks.md, "Against vLLM's
# CPU build"). Read once, when torch loads its OpenMP runtime: so only before torch is
# imported, and never over the user's own setting.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# public name -> module that defines it (imported lazily, see __getattr__)
_LAZY = {
    "LLM": "engine.llm",
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
    from engine.models.registry import ModelRegistry
    from engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
    from engine.sampling_params import SamplingParams, StructuredOutputsParams
    from engine.utils import set_random_seed


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
