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

# How OpenMP threads wait for work between parallel regions (a decode step is
# hundreds of them). On a machine with idle cores they should spin briefly: waking
# a sleeping thread costs tens of microseconds per region, a third of a bf16 decode
# step here. On a machine whose cores are all busy they must sleep: a thread
# spinning on the core its descheduled partner needs made decoding up to 10x
# slower. libgomp reads its settings once, when torch loads it, so the choice is
# made here, only before torch is imported and never over the user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT (docs/benchmarks.md, "OpenMP waiting").
_SPIN_COUNT = "20000"  # ~tens of microseconds: covers the gaps inside one step


def _cores_are_busy() -> bool | None:
    """Whether other work occupies every core right now: as many other runnable
    threads as cores (``/proc/loadavg``'s running count, less this one), or a
    one-minute load average a core above the core count. None when unknown."""
    try:
        cpus = len(os.sched_getaffinity(0))
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        load1, running = float(fields[0]), int(fields[3].split("/")[0])
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return running - 1 >= cpus or load1 >= cpus + 1


def _choose_omp_wait() -> None:
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    busy = _cores_are_busy()
    if busy is None:  # not Linux: leave the runtime's default
        return
    if busy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = _SPIN_COUNT


_choose_omp_wait()

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
