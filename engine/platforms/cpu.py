"""The built-in CPU platform: always available, gloo for collectives."""

from __future__ import annotations

import os

from engine.platforms.interface import Platform, PlatformEnum


def _cgroup_memory_limit() -> int | None:
    """The container's memory limit in bytes, when one is set (cgroup v2 or v1)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (AMX tiles or
    AVX512-BF16). ``ENGINE_CPU_NATIVE_BF16=0`` / ``=1`` overrides the check."""
    forced = os.environ.get("ENGINE_CPU_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


class CpuPlatform(Platform):
    """Runs the engine on the host CPU with the default torch worker."""

    _enum = PlatformEnum.CPU
    device_name = "cpu"
    device_type = "cpu"
    supported_dtypes = ("float32", "bfloat16", "float16")

    @classmethod
    def get_default_dist_backend(cls) -> str:
        return "gloo"

    @classmethod
    def device_count(cls) -> int:
        return 1

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        """Physical memory, capped by the container's limit when there is one."""
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = _cgroup_memory_limit()
        return min(total, limit) if limit else total

    @classmethod
    def mem_get_info(cls, device_id: int = 0) -> tuple[int, int]:
        total = cls.get_device_total_memory(device_id)
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            free = total
        return min(free, total), total

    @classmethod
    def preferred_dtype(cls) -> str:
        """bfloat16 when the CPU computes it natively (AMX or AVX512-BF16, where
        oneDNN's bf16 matmuls beat float32), else float32."""
        return "bfloat16" if cpu_has_native_bf16() else "float32"
