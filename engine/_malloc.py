"""glibc malloc settings for a process that runs the model.

By default glibc hands memory back to the kernel as soon as the top of a heap
has more than 128 KiB free, and serves blocks above a (self-adjusting) size
threshold with their own mmap. A prefill step allocates and frees activations of
megabytes each, layer after layer, so every step faults the same memory back in
from the kernel, a zeroed page at a time: 240,000-340,000 page faults for the two
prefill steps of 32 fresh prompts (7,320 tokens) of SmolLM2-135M in bfloat16, and
those steps took 1.2-1.3x the time they take without them. Keeping freed memory in
the process (a high trim threshold and top pad) and serving blocks up to the
largest allowed mmap threshold from the heap lets each step reuse the previous
step's pages. The cost is resident memory: the process keeps its peak of freed
activations instead of returning it (sleep mode and model loading trim it).

Every CPU worker applies them when it sets up its device (`engine.worker.Worker`):
offline `LLM`, `engine serve` and every other command. ``ENGINE_KEEP_FREED_MEMORY=0``
(or its older name ``ENGINE_SERVER_KEEP_FREED_MEMORY=0``) leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MIB = 1 << 20
# freed memory at the top of a heap kept before it is given back to the kernel
TRIM_THRESHOLD = 1024 * _MIB
# extra memory asked from the kernel whenever a heap grows
TOP_PAD = 64 * _MIB
# blocks up to this size come from the heap (glibc refuses more than 32 MiB on 64-bit)
MMAP_THRESHOLD = 32 * _MIB


@functools.cache
def libc() -> ctypes.CDLL | None:
    """This process's C library through ctypes (errno kept for
    ``ctypes.get_errno``), looked up once: find_library runs ldconfig. None where
    it cannot be loaded. Also used for ``madvise`` (engine.worker.kv_prefault)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def trim() -> bool:
    """Give the freed pages of glibc's heaps back to the kernel (``malloc_trim``);
    False where the C library has none (not glibc)."""
    malloc_trim = getattr(libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def keep_freed_memory() -> bool:
    """Apply the settings above to this process's glibc malloc; False (and nothing
    changed) where the C library has no ``mallopt`` (musl, macOS) or refuses one,
    or when ``ENGINE_KEEP_FREED_MEMORY=0`` (``ENGINE_SERVER_KEEP_FREED_MEMORY=0``,
    its older name)."""
    if "0" in (os.environ.get("ENGINE_KEEP_FREED_MEMORY"),
               os.environ.get("ENGINE_SERVER_KEEP_FREED_MEMORY")):
        return False
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                         (_M_TOP_PAD, TOP_PAD)):
        if mallopt(param, value) != 1:  # mallopt answers 1 on success
            logger.debug("mallopt(%d, %d) was refused", param, value)
            ok = False
    return ok
