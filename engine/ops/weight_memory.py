"""Memory for model weights: large CPU weights in transparent huge pages, on request.

A decode step reads every weight once, in order, and is bound by that stream.
With 4 KiB pages each page of weight is a TLB miss, and in a virtual machine a
miss walks two page tables (the guest's and the host's). With
``ENGINE_WEIGHT_HUGE_PAGES=1``, `empty_weight` gives a weight of at least one huge
page its own anonymous mapping, aligned to 2 MiB and advised ``MADV_HUGEPAGE``
(which the kernel honours when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``), before anything is written to it: no copy, and no
extra resident memory (the alignment slack is never touched). Otherwise, and on
every platform without ``MADV_HUGEPAGE``, it is ``torch.empty``.

`engine serve` turns it on (`engine.cli.serve.server_environment`) unless the user
set the variable; offline use keeps ordinary pages. Measured in fresh processes one
after another (docs/serving.md, "Weights in huge pages"): a single request's bf16
decode took 0.83-0.89x the time in huge pages, batched throughput the same, while a
fresh huge page costs far more to fault in than 512 small ones on the team's VMs
(loading took 0-3 s longer; 540 MB of float32 weights 0.3-0.8 s, docs/fp32-decode.md).
An earlier A/B between two processes running at once (docs/fp32-decode.md) could not
see the decode gain: the first-started of two such processes decodes ~10% slower for
its whole life (less with huge pages: A/A 0.86-0.91x in 4 KiB pages, 0.91-1.00x in
huge pages), which hid it.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
ENV = "ENGINE_WEIGHT_HUGE_PAGES"
_ADVICE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def huge_pages_enabled() -> bool:
    """Whether `empty_weight` maps large weights in huge pages here: the platform
    has ``MADV_HUGEPAGE`` and ``ENGINE_WEIGHT_HUGE_PAGES`` is 1."""
    if _ADVICE is None or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "true", "yes")


def empty_weight(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of `shape` (default dtype and device unless given),
    like ``torch.empty``; on the CPU, when `huge_pages_enabled`, one of at least
    `HUGE_PAGE` bytes lies in its own 2 MiB-aligned mapping advised for
    transparent huge pages (freed with the tensor)."""
    dtype = dtype or torch.get_default_dtype()
    nbytes = math.prod(shape) * dtype.itemsize
    if (_ADVICE is None or nbytes < HUGE_PAGE or torch.get_default_device().type != "cpu"
            or not huge_pages_enabled()):
        return torch.empty(*shape, dtype=dtype)
    # a private anonymous mapping: Python's default (shared) would be shmem,
    # which transparent huge pages leave alone on most systems
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=_FLAGS)
    region.madvise(_ADVICE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` until freed
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)
