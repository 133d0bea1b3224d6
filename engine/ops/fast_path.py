"""Fast paths: a model's steps without the Python between its kernels.

A decode step (one new token per sequence) of a small model is mostly short kernel
calls: SmolLM-135M makes about ten a layer, 300 a token, tens of microseconds each
for the quantized and single-row products. The Python around them (a module's
``__call__``, a `CustomOp`'s forward dispatch, the checks each op repeats on every
call: dtypes, devices, the kernel-path variables) cost about as much as the kernels
themselves on such a step, and a few percent of a prompt step. A fast path is a
model's layers built once from its ops' fast forms (each op's ``fast_fn``: the same
kernel call its forward would make, with everything that cannot change between
steps decided when the fast path is built), run in place of the module calls while
nothing it relied on changes.

The contract, for a model that builds one (`engine.models.llama` does):

- a fast form computes exactly what the op's forward computes, bit for bit, or
  returns None and the op's forward runs (an input it was not built for: more rows
  than its kernel takes, a step with prompt rows for the decode attention kernel);
  an op without a fast form (a plugin's replacement, a disabled op, LoRA, tensor
  parallelism, no compiled kernels) runs its forward;
- the fast path is not taken when a forward hook is set on any module it skips, or
  a global one (`HookWatch`, checked every step), under torch.compile, or
  when the model's structure is not the one its layers reproduce; it is rebuilt
  when `fast_path_key` changes (the kernel-path variables; the model adds the
  activation dtype);
- whatever replaces a model's tensors drops its fast path (`forget_fast_paths`):
  packing weights, sleep mode's offload. KV caches are read from their layers at
  every call, so binding new caches needs nothing.

A model may also run a whole decode step's layers as one compiled call that makes
the fast forms' kernel calls from C++ (`engine.models.llama` does, by
``engine_kernels::decode_layers``), under the same contract: bit for bit the fast
forms' step, or not taken.

``ENGINE_FAST_PATH=0`` turns fast paths off (every step through the modules), for
comparison and as an escape hatch; ``ops`` keeps them but calls every fast form from
Python (no one-call decode steps), to measure or rule out that call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules import module as _module

FAST_PATH_ENV = "ENGINE_FAST_PATH"
# the variables fast forms read once, when they are built
_KEY_VARIABLES = ("ENGINE_KERNEL_PATH", "ENGINE_QUANT_KERNEL_PATH")


_MODES = ("0", "1", "ops")


def fast_path_mode() -> str:
    """``ENGINE_FAST_PATH``: ``"1"`` (default: fast paths, whole decode steps in one
    call where the model has it), ``"ops"`` (fast paths, every kernel called from
    Python) or ``"0"`` (none). Raises ValueError naming the variable otherwise."""
    value = os.environ.get(FAST_PATH_ENV, "1").strip().lower()
    if value not in _MODES:
        raise ValueError(f"{FAST_PATH_ENV}={value!r}: expected 0, 1 or ops")
    return value


def fast_path_enabled() -> bool:
    """Whether ``ENGINE_FAST_PATH`` allows fast paths (default: yes; see `fast_path_mode`)."""
    return fast_path_mode() != "0"


def fast_path_key() -> tuple[str | None, ...]:
    """What fast forms fix when they are built: a fast path built under another
    key is rebuilt (a test or a user may change these between steps)."""
    return tuple(os.environ.get(name) for name in _KEY_VARIABLES)


class HookWatch:
    """Whether a forward hook (global, or on one of `modules`) would run if these
    modules were called: then the fast path, which calls no module, must not run.
    Checked every step, so the modules' hook dicts are collected once (a module
    keeps its dicts for life; registering or removing a hook changes their
    contents) and tested in one pass: ~15 µs for SmolLM2's 361 modules, where
    reading two attributes of each took ~0.3 ms."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._dicts = [hooks for m in modules for hooks in (m._forward_hooks, m._forward_pre_hooks)]

    def __call__(self) -> bool:
        return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                    or any(self._dicts))


def forget_fast_paths(model: nn.Module) -> None:
    """Drop the fast paths of `model` and its submodules: their fast forms hold the
    tensors they were built with, which the caller is about to replace."""
    for module in model.modules():
        if getattr(module, "fast_path", None) is not None:
            vars(module)["fast_path"] = None
