"""`Worker`: the default torch worker, used by the cpu and cuda platforms."""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine.step import ModelRunnerOutput, SchedulerOutput
from engine.worker.model_runner import ModelRunner
from engine.worker.worker_base import KVCacheSpec, WorkerBase

logger = logging.getLogger(__name__)


class Worker(WorkerBase):
    """Runs the model of one rank with plain PyTorch on the platform's device.

    Subclass it to change one step of the life cycle (device setup, memory
    sizing, warm-up) and keep the rest.
    """

    def __init__(self, config: Any, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: str | None = None) -> None:
        super().__init__(config, rank, local_rank, distributed_init_method)
        self.device: torch.device | None = None
        self.model_runner: ModelRunner | None = None

    def init_device(self) -> None:
        from engine.distributed import parallel_state
        from engine.platforms import current_platform

        self.device = current_platform.device_for_rank(self.local_rank)
        current_platform.set_device(self.device)
        parallel = self.config.parallel_config
        parallel_state.init_distributed_environment(
            world_size=parallel.tensor_parallel_size,
            rank=self.rank,
            distributed_init_method=self.distributed_init_method,
            backend=parallel.distributed_backend or current_platform.get_default_dist_backend(),
        )
        parallel_state.initialize_model_parallel(parallel.tensor_parallel_size)
        # the platform's kernels and the seed: engine.executor.build_worker, for every worker class
        self.model_runner = ModelRunner(self.config, self.device, is_driver=self.rank == 0)

    def load_model(self) -> None:
        self.model_runner.load_model()

    def get_supported_tasks(self) -> tuple[str, ...]:
        """("generate",) for causal LMs, ("embed",) for pooling models."""
        return ("generate",) if self.model_runner.is_generative else ("embed",)

    def get_kv_cache_spec(self) -> KVCacheSpec | None:
        from engine.attention import get_attention_layers

        layers = get_attention_layers(self.model_runner.model)
        if not layers:
            return None
        first = layers[0]
        if any((a.num_kv_heads, a.head_size) != (first.num_kv_heads, first.head_size)
               for a in layers):
            raise ValueError("attention layers with different KV shapes are not supported yet")
        dtype = self.model_runner.dtype
        block_size = self.config.cache_config.block_size
        element_size = torch.empty((), dtype=dtype).element_size()
        page = 2 * len(layers) * block_size * first.num_kv_heads * first.head_size * element_size
        return KVCacheSpec(
            block_size=block_size,
            num_layers=len(layers),
            num_kv_heads=first.num_kv_heads,
            head_size=first.head_size,
            dtype=str(dtype).removeprefix("torch."),
            page_size_bytes=page,
        )

    def determine_available_memory(self) -> int:
        """``cache_config.kv_cache_memory`` bytes when set, else the configured
        fraction of the device's total memory (capped by what is free on devices
        that report it)."""
        from engine.platforms import current_platform

        cache = self.config.cache_config
        if cache.kv_cache_memory is not None:
            return int(cache.kv_cache_memory)
        total = current_platform.get_device_total_memory()
        budget = int(total * cache.kv_cache_memory_fraction)
        if self.device is not None and self.device.type != "cpu":
            free, _ = current_platform.mem_get_info()
            budget = min(budget, int(free * 0.9))
        return budget

    def initialize_cache(self, num_blocks: int) -> None:
        from engine.attention import bind_kv_cache, get_attention_layers

        model = self.model_runner.model
        block_size = self.config.cache_config.block_size
        dtype = self.model_runner.dtype
        caches = []
        for layer in get_attention_layers(model):
            shape = layer.backend.get_kv_cache_shape(
                num_blocks, block_size, layer.num_kv_heads, layer.head_size
            )
            # zeros, not empty: padded reads past a sequence's end must stay finite
            caches.append(torch.zeros(shape, dtype=dtype, device=self.device))
        bind_kv_cache(model, caches)
        self.config.cache_config.num_blocks = num_blocks

    def compile_or_warm_up_model(self) -> None:
        """Nothing to compile for eager PyTorch; the first step warms up itself."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        return self.model_runner.embed(token_id_lists)

    def shutdown(self) -> None:
        self.model_runner = None
