"""Paging the KV cache in ahead of use, while the CPU has nothing else to do.

The CPU worker's KV cache is untouched memory until a step writes it
(`engine.worker.worker._zeroed_untouched`: a cache of gigabytes would otherwise be
resident, and seconds to zero, from the start). The cost is paid by the step that
first writes each page: a fresh 256-token prompt on a 135M model writes 1,440 new
4 KiB pages, ~2.4 ms of page faults in its cache writes, about 4% of its time to
first token (docs/prefill.md, "The KV cache's first touch").

Blocks are handed out in ascending order until the cache has been used once
(`engine.core.kv_cache_manager`: never-used blocks come first, freed ones go back
behind them or in front, already paged in), so everything past the highest block
used so far is untouched. After each step the worker tells a `KVPrefault` the
highest block the step used; its thread then asks Linux to page in the blocks up to
`ahead_blocks` past it (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14+: the pages are
made resident and writable without touching their contents, so a step writing
them at the same time loses nothing). The thread runs at ``SCHED_IDLE`` priority:
only when no other thread wants the CPU (between requests, or while the engine
waits), never in a step's way. Where the call is refused (an older kernel, another
OS), it stops and the steps fault the pages in as before.

Resident memory grows by at most `ahead_blocks` blocks past what the cache holds:
the worker's window is the step budget, at most AHEAD_TOKENS tokens and an eighth
of the cache (AHEAD_FRACTION_OF); with ``kv_prefault="all"`` (`engine serve`'s
default, and what ``"auto"`` means for a cache given its size by kv_cache_memory) it
is the whole cache, paged in while the CPU is otherwise idle.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Callable

import torch

from engine._malloc import libc

logger = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14
# at most this many tokens' blocks are paged in past the highest block used (the
# worker takes the step budget when smaller), and at most 1/AHEAD_FRACTION_OF of
# the cache's blocks
AHEAD_TOKENS = 2048
AHEAD_FRACTION_OF = 8
# blocks per madvise call: short calls keep the address space's lock brief (a
# large allocation on the main thread waits for it)
BLOCKS_PER_CALL = 4
# the thread checks this often whether its cache still exists
LIVENESS_S = 1.0
# how long `stop` waits for the thread: with every core busy an idle-priority
# thread may not run for a while; it then ends by itself, and a cache freed
# meanwhile is safe from it (it holds the caches by weak reference)
STOP_WAIT_S = 1.0

_PAGE = mmap.PAGESIZE
# the live ones, stopped at interpreter exit: a daemon thread still running then
# would be ended inside its call
_LIVE: weakref.WeakSet[KVPrefault] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for prefault in list(_LIVE):
        prefault.stop()


def _madvise() -> Callable[[int, int, int], int] | None:
    func = getattr(libc(), "madvise", None)
    if func is None:
        return None
    func.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    func.restype = ctypes.c_int
    return func


class KVPrefault:
    """Pages in the blocks past the highest one used, on an idle-priority thread.

    `caches`: the per-layer cache tensors, each [2, num_blocks, ...] contiguous
    (K then V, a block's bytes contiguous within each); `ahead_blocks`: how far
    past the highest used block to keep paged in. `used(block)` after each step;
    `stop()` before the caches go away (sleep, shutdown). Holds the caches by weak
    reference only: a worker dropped without `stop()` frees them, and the thread
    ends within LIVENESS_S."""

    def __init__(self, caches: list[torch.Tensor], num_blocks: int, ahead_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ahead_blocks = ahead_blocks
        self._refs = [weakref.ref(t) for t in caches]
        # each cache's (address, bytes of its K half), read here: the thread makes
        # no torch call
        self._spans = [(t.data_ptr(), t[0].numel() * t.element_size()) for t in caches]
        self._done = 0  # blocks [0, _done) are paged in (or were used)
        self._target = min(num_blocks, ahead_blocks)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-kv-prefault", daemon=True)
        self._wake.set()  # the first window, while the engine starts
        _LIVE.add(self)
        self._thread.start()

    @staticmethod
    def applies_to(caches: list[torch.Tensor], num_blocks: int) -> bool:
        """Whether `caches` have the layout this class pages in block by block."""
        return bool(caches) and all(
            t.device.type == "cpu" and t.dim() >= 2 and t.shape[0] == 2
            and t.shape[1] == num_blocks and t.is_contiguous() for t in caches)

    @property
    def paged_in(self) -> int:
        """Blocks [0, paged_in) are resident (paged in here, or used by a step)."""
        return self._done

    @property
    def running(self) -> bool:
        """Whether the thread is still there (it ends on `stop`, when the caches
        are gone, or when Linux refuses the call)."""
        return self._thread.is_alive()

    def used(self, block: int) -> None:
        """A step used blocks up to `block`: keep `ahead_blocks` more paged in."""
        target = min(self.num_blocks, block + 1 + self.ahead_blocks)
        if target > self._target:
            self._target = target
            self._wake.set()

    def stop(self) -> None:
        """End the thread: waits for its current call (microseconds), at most
        STOP_WAIT_S for an idle-priority thread to get a core."""
        self._stopped = True
        self._wake.set()
        _LIVE.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except (AttributeError, OSError):
            pass  # not Linux: ordinary priority, still off the steps' thread
        madvise = _madvise()
        while not self._stopped:
            if not self._wake.wait(LIVENESS_S):
                if any(ref() is None for ref in self._refs):
                    return
                continue
            self._wake.clear()
            while not self._stopped and self._done < self._target:
                end = min(self._done + BLOCKS_PER_CALL, self._target)
                if madvise is None or not self._page_in(madvise, self._done, end):
                    return
                self._done = end

    def _page_in(self, madvise: Callable[[int, int, int], int], begin: int, end: int) -> bool:
        """madvise blocks [begin, end) of every cache in; False when the caches are
        gone or Linux refuses (the thread then ends)."""
        for ref, (address, half) in zip(self._refs, self._spans, strict=True):
            cache = ref()  # held while Linux pages its memory in
            if cache is None:
                return False
            block_bytes = half // self.num_blocks
            for part in (0, 1):
                start = address + part * half + begin * block_bytes
                stop = start + (end - begin) * block_bytes
                start -= start % _PAGE
                stop += -stop % _PAGE
                if madvise(start, stop - start, MADV_POPULATE_WRITE) != 0:
                    errno = ctypes.get_errno()
                    logger.debug("KV prefault stops: madvise failed (%s)", os.strerror(errno))
                    return False
            del cache
        return True
