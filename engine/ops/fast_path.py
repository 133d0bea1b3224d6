"""Decode programs: a model's decode steps without the Python between its kernels.

A decode step (one new token per sequence) of a small model is mostly short kernel
calls: SmolLM-135M makes about ten a layer, 300 a token, a few microseconds each
for the quantized and single-row products. The Python around them — a module's
``__call__``, a `CustomOp`'s forward dispatch, the checks each op repeats on every
call (dtypes, devices, the kernel-path variables) — cost about as much as the
kernels themselves on such a step. A decode program is a model's decode forward
built once from its ops' fast forms (each op's ``decode_fn``: the same kernel call
its forward would make, with everything that cannot change between steps decided
when the program is built), and run in place of the module calls while nothing it
relied on changes.

The contract, for a model that builds one (`engine.models.llama` does):

- a fast form computes exactly what the op's forward computes for the inputs a
  decode step gives it, bit for bit, or returns None and the op's forward runs
  (an input it was not built for: too many rows for its kernel, a step that is
  not decode-only); an op without a fast form (a plugin's replacement, a disabled
  op, LoRA, tensor parallelism) runs its forward;
- the program is used only for steps whose sequences all decode one token, with
  no forward hooks on any module it skips (`hooks_present`, checked every step),
  outside torch.compile, and while `program_key` is what it was at build time
  (the kernel-path variables, ``ENGINE_DECODE_PROGRAM``);
- whatever replaces a model's tensors drops its programs (`forget_programs`):
  packing weights, sleep mode's offload and restore. KV caches are read from
  their layers at every call, so binding new caches needs nothing.

``ENGINE_DECODE_PROGRAM=0`` turns programs off (every step through the modules),
for comparison and as an escape hatch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules import module as _module

PROGRAM_ENV = "ENGINE_DECODE_PROGRAM"
# the variables a program's fast forms read once, at build time
_KEY_VARIABLES = (PROGRAM_ENV, "ENGINE_KERNEL_PATH", "ENGINE_QUANT_KERNEL_PATH")


def programs_enabled() -> bool:
    """Whether ``ENGINE_DECODE_PROGRAM`` allows decode programs (default: yes).
    Raises ValueError naming the variable for a value other than 0/1."""
    value = os.environ.get(PROGRAM_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{PROGRAM_ENV}={value!r}: expected 0 or 1")
    return value == "1"


def program_key() -> tuple[str | None, ...]:
    """What a program's fast forms fixed when it was built: a program built under
    another key is rebuilt (a test or a user may change these between steps)."""
    return tuple(os.environ.get(name) for name in _KEY_VARIABLES)


def hooks_present(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward hook (global, or on one of `modules`) would run if these
    modules were called: then the program, which calls no module, must not run."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def forget_programs(model: nn.Module) -> None:
    """Drop the decode programs of `model` and its submodules: their fast forms hold
    the tensors they were built with, which the caller is about to replace."""
    for module in model.modules():
        if getattr(module, "decode_program", None) is not None:
            vars(module)["decode_program"] = None
