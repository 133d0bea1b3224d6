"""Acme's compiled kernels, declared as torch operators with `torch.library`.

A real vendor would load a shared library here (``torch.ops.load_library``);
the example defines ``acme::rms_norm`` with a CPU implementation in Python so that
it runs anywhere. `AcmePlatform.import_kernels` calls `load` once per process,
before the model is built.
"""

from __future__ import annotations

import acme_platform

_library = None  # the torch.library.Library that owns the definitions


def load() -> None:
    """Define the ``acme`` operators (idempotent)."""
    global _library
    if _library is not None:
        return
    import torch

    lib = torch.library.Library("acme", "DEF")
    lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
    lib.impl("rms_norm", _rms_norm_cpu, "CPU")
    _library = lib
    acme_platform.STATS["kernels_loaded"] += 1


def _rms_norm_cpu(x, weight, eps: float):
    acme_platform.STATS["rms_norm_kernel_calls"] += 1
    h = x.float()
    h = h * (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return weight * h.to(x.dtype)
