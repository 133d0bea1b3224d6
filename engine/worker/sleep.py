"""Sleep mode on the worker side: give the memory of a model back while the
engine is idle, and take it again (docs/sleep-and-warm-up.md).

`offload_weights` empties every parameter, buffer and tensor attribute of a
model in place (the modules stay, so nothing that holds a module is left
dangling); with ``keep=True`` it first writes their bytes to an unlinked
temporary file, which `restore_weights` reads back into fresh memory. Opaque
tensors (oneDNN's prepacked weights) cannot be read: they are dropped, and the
model runner packs them again on wake-up.
Level 1 of `Worker.sleep` keeps them, level 2 does not (wake-up then reloads
the checkpoint). `release_freed_memory` returns what was freed to the
operating system, so that the process's resident memory really drops.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from dataclasses import dataclass, field
from typing import IO

import torch
import torch.nn as nn

from engine import _malloc
from engine.ops.fast_path import forget_fast_paths
from engine.ops.weight_memory import empty_weight

logger = logging.getLogger(__name__)

# offsets in the weight file: page-aligned, so each tensor reads back in whole pages
_ALIGN = 4096


@dataclass
class _Slot:
    """Where one emptied tensor lived and where its bytes are in the file."""

    module: nn.Module
    name: str
    kind: str  # "parameter" | "buffer" | "attribute"
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    key: int  # index of its bytes in `OffloadedWeights.entries` (tensors that share one)


@dataclass
class OffloadedWeights:
    """The emptied tensors of one model; `file` holds their bytes when kept."""

    slots: list[_Slot] = field(default_factory=list)
    entries: list[tuple[int, int]] = field(default_factory=list)  # (offset, nbytes)
    file: IO[bytes] | None = None
    nbytes: int = 0  # bytes freed

    def close(self) -> None:
        """Drop the file (its space goes back at once: it was never linked)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _tensors(model: nn.Module):
    """(module, name, kind, tensor) for every parameter, buffer and tensor
    attribute of `model`."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                yield module, name, "parameter", p
        for name, b in module._buffers.items():
            if b is not None:
                yield module, name, "buffer", b
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                yield module, name, "attribute", value


def _set(module: nn.Module, name: str, kind: str, tensor: torch.Tensor) -> None:
    if kind == "parameter":
        param = module._parameters[name]
        assert param is not None  # _tensors yields only the parameters that are set
        param.data = tensor
    elif kind == "buffer":
        module._buffers[name] = tensor
    else:
        setattr(module, name, tensor)


def offload_weights(model: nn.Module, keep: bool) -> OffloadedWeights:
    """Empty every tensor of `model` in place; with `keep`, write their bytes to
    an unlinked temporary file first (in ``tempfile.gettempdir()``: put TMPDIR
    on a disk, not a tmpfs, or the memory only moves). Tensors that share
    memory (tied weights) are written once and share it again after
    `restore_weights`."""
    forget_fast_paths(model)  # a fast path holds the weights it was built with
    out = OffloadedWeights(file=tempfile.TemporaryFile(prefix="engine-sleep-") if keep else None)
    seen: dict[tuple, int] = {}
    offset = 0
    for module, name, kind, t in list(_tensors(model)):
        if t.is_mkldnn:  # derived and opaque (oneDNN's packed weights): rebuilt on wake-up
            setattr(module, name, None)
            continue
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        key = seen.get(ident)
        if key is None:
            key = seen[ident] = len(out.entries)
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            nbytes = data.numel()
            if out.file is not None:
                offset = -(-offset // _ALIGN) * _ALIGN
                out.file.seek(offset)
                out.file.write(memoryview(data.numpy()))
            out.entries.append((offset, nbytes))
            offset += nbytes
            out.nbytes += nbytes
        out.slots.append(_Slot(module, name, kind, tuple(t.shape), t.dtype, t.device, key))
        _set(module, name, kind, torch.empty(0, dtype=t.dtype, device=t.device))
    if out.file is not None:
        out.file.flush()
    return out


def restore_weights(offloaded: OffloadedWeights) -> None:
    """Read every tensor `offload_weights` kept back into its place, then drop
    the file. Raises ValueError when the weights were not kept (level 2)."""
    if offloaded.file is None:
        raise ValueError("the weights were discarded (sleep level 2): reload the model")
    restored: dict[int, torch.Tensor] = {}
    for slot in offloaded.slots:
        t = restored.get(slot.key)
        if t is None:
            offset, nbytes = offloaded.entries[slot.key]
            # large weights back in huge pages, as they were loaded (weight_memory)
            buf = empty_weight(nbytes // slot.dtype.itemsize, dtype=slot.dtype).view(torch.uint8)
            offloaded.file.seek(offset)
            if offloaded.file.readinto(buf.numpy().data) != nbytes:  # type: ignore[attr-defined]
                raise OSError("the sleep-mode weight file is shorter than what was written")
            t = restored[slot.key] = buf.view(slot.dtype).view(slot.shape).to(slot.device)
        _set(slot.module, slot.name, slot.kind, t)
    offloaded.close()


def release_freed_memory(device: torch.device | None = None, collect_garbage: bool = True) -> None:
    """Hand freed memory back to the operating system: collect garbage (unless
    `collect_garbage` is False: a full collection takes ~0.1 s with torch
    loaded, and tensors are freed by reference counting anyway), then glibc's
    ``malloc_trim`` (freed heap pages otherwise stay in the process) and, on
    CUDA, torch's cached blocks."""
    if collect_garbage:
        gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    _malloc.trim()
