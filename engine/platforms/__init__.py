"""Platforms: the hardware backend the engine runs on (see "Platform interface" in
docs/reference.md).

`current_platform` is a lazy handle: importing it resolves nothing; the first
attribute access runs platform resolution (see `_resolution`) and every later
access goes to the chosen `Platform` subclass. `current_platform.import_kernels()`
runs the platform's `import_kernels` at most once per process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from engine.platforms._resolution import (
    PlatformResolution,
    PlatformResolutionError,
    dry_run_resolution,
    resolve_platform_cls,
)
from engine.platforms.cpu import CpuPlatform
from engine.platforms.cuda import CudaPlatform
from engine.platforms.interface import Platform, PlatformEnum

__all__ = [
    "Platform",
    "PlatformEnum",
    "CpuPlatform",
    "CudaPlatform",
    "PlatformResolution",
    "PlatformResolutionError",
    "cpu_platform_plugin",
    "cuda_platform_plugin",
    "current_platform",
    "dry_run_resolution",
    "is_platform_resolved",
    "reset_current_platform",
    "resolve_platform_cls",
]


def cpu_platform_plugin() -> str:
    """Built-in `cpu` platform plugin: the CPU is always there."""
    return "engine.platforms.cpu.CpuPlatform"


def cuda_platform_plugin() -> str | None:
    """Built-in `cuda` platform plugin: active when torch sees a CUDA device."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    return "engine.platforms.cuda.CudaPlatform"


_lock = threading.RLock()
_platform_cls: type[Platform] | None = None
_kernels_imported: set[type] = set()


def _resolved() -> type[Platform]:
    global _platform_cls
    if _platform_cls is None:
        with _lock:
            if _platform_cls is None:
                _platform_cls = resolve_platform_cls()
    return _platform_cls


def _import_kernels_once() -> None:
    cls = _resolved()
    with _lock:
        if cls in _kernels_imported:
            return
        cls.import_kernels()
        _kernels_imported.add(cls)


class _CurrentPlatform:
    """Forwards attribute access to the platform class resolved on first use."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "import_kernels":
            return _import_kernels_once
        return getattr(_resolved(), name)

    def __repr__(self) -> str:
        if _platform_cls is None:
            return "<current_platform (not resolved yet)>"
        return f"<current_platform {_platform_cls.__module__}.{_platform_cls.__qualname__}>"


if TYPE_CHECKING:
    # what type checkers see: every attribute is the chosen Platform subclass's
    current_platform: type[Platform]
else:
    current_platform = _CurrentPlatform()


def is_platform_resolved() -> bool:
    """Whether `current_platform` has been resolved in this process."""
    return _platform_cls is not None


def reset_current_platform() -> None:
    """Forget the resolved platform so that the next access resolves again (after
    `ENGINE_PLATFORM` or the plugin set changed, e.g. `LLM(platform=...)`)."""
    global _platform_cls
    with _lock:
        _platform_cls = None
