"""The built-in CUDA platform: NVIDIA GPUs through torch.cuda, NCCL collectives.

Importing this module never touches CUDA, so it imports (and the `cuda` plugin
answers None) on machines without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.platforms.interface import Platform, PlatformEnum

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from engine.config import EngineConfig


class CudaPlatform(Platform):
    """Runs the engine on NVIDIA GPUs, one GPU per tensor-parallel rank."""

    _enum = PlatformEnum.CUDA
    device_name = "cuda"
    device_type = "cuda"
    supported_dtypes = ("bfloat16", "float16", "float32")

    @classmethod
    def check_and_update_config(cls, config: EngineConfig) -> None:
        """As the base class, and refuse more tensor-parallel ranks than GPUs."""
        super().check_and_update_config(config)
        tp, gpus = config.parallel_config.tensor_parallel_size, cls.device_count()
        if tp > gpus:
            raise ValueError(
                f"tensor_parallel_size={tp} needs {tp} GPUs, but only {gpus} are visible "
                "(check CUDA_VISIBLE_DEVICES)"
            )

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        import torch

        return torch.cuda.get_device_name(device_id)

    @classmethod
    def get_default_dist_backend(cls) -> str:
        return "nccl"

    @classmethod
    def device_for_rank(cls, local_rank: int) -> torch.device:
        import torch

        return torch.device("cuda", local_rank)

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        import torch

        torch.cuda.set_device(device)

    @classmethod
    def device_count(cls) -> int:
        import torch

        return torch.cuda.device_count()

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        import torch

        return torch.cuda.get_device_properties(device_id).total_memory

    @classmethod
    def mem_get_info(cls, device_id: int = 0) -> tuple[int, int]:
        import torch

        return torch.cuda.mem_get_info(device_id)
