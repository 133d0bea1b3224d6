"""`Worker`: the default torch worker, used by the cpu and cuda platforms."""

from __future__ import annotations

import logging
import math
import mmap
from typing import Any

import torch

from engine._malloc import keep_freed_memory
from engine._openmp import passive_notice
from engine.config import EngineConfig
from engine.step import ModelRunnerOutput, SchedulerOutput
from engine.utils import STARTUP_LOGGER
from engine.worker.kv_prefault import AHEAD_FRACTION_OF, AHEAD_TOKENS, KVPrefault
from engine.worker.model_runner import ModelRunner
from engine.worker.sleep import (
    OffloadedWeights,
    offload_weights,
    release_freed_memory,
    restore_weights,
)
from engine.worker.worker_base import KVCacheSpec, WorkerBase

logger = logging.getLogger(__name__)


def _zeroed_untouched(shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device | None) -> torch.Tensor:
    """A zero tensor whose memory is not touched until it is written, on the CPU:
    its own anonymous memory map, whose pages the kernel hands out zeroed and
    makes resident one by one as the cache fills (`torch.zeros` writes every
    page: seconds, and resident memory, for a cache of gigabytes; calloc does
    too when glibc serves the request from freed heap memory, as it does below
    its mmap threshold, which grows to 32 MiB as a process frees large blocks).
    Page-aligned, so every vector load of the CPU kernels is aligned. Other
    devices: `torch.zeros`."""
    if device is not None and device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # private: plain anonymous pages, copied on write in a forked child (a
    # shared map would be shmem, counted apart and shared with the child)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _small_pages(pages)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)  # keeps the map


def _small_pages(pages: mmap.mmap) -> None:
    """Ask Linux to back `pages` with ordinary pages, not transparent huge
    pages: a KV cache is filled a few blocks at a time, and each new 2 MiB page
    would be zeroed (and, with the kernel's ``defrag=madvise`` default,
    compacted for) on the first write of a step: up to milliseconds in one
    cache write, about a sixth of a fresh prompt's time (docs/prefill.md).
    Nothing happens where madvise is unavailable."""
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            pages.madvise(advice)
        except OSError:  # a kernel without transparent huge pages
            pass


class Worker(WorkerBase):
    """Runs the model of one rank with plain PyTorch on the platform's device.

    Subclass it to change one step of the life cycle (device setup, memory
    sizing, warm-up) and keep the rest.
    """

    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: str | None = None) -> None:
        super().__init__(config, rank, local_rank, distributed_init_method)
        self.device: torch.device | None = None
        self.model_runner: ModelRunner | None = None
        self._asleep: OffloadedWeights | None = None  # sleep mode: what sleep() emptied
        self._prefault: KVPrefault | None = None  # pages the KV cache in ahead of use

    def init_device(self) -> None:
        from engine.distributed import parallel_state
        from engine.platforms import current_platform

        self.device = current_platform.device_for_rank(self.local_rank)
        current_platform.set_device(self.device)
        if self.device.type == "cpu":
            # each step's activations reuse the last step's heap pages instead of
            # faulting them in from the kernel (engine._malloc)
            keep_freed_memory()
            notice = passive_notice()
            if notice is not None and self.rank == 0:
                logging.getLogger(STARTUP_LOGGER).info(notice)
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
        # loading frees as much as it keeps (bytes read, fused rows stacked, float
        # parameters released for quantized ones); glibc keeps freed heap pages
        # resident until trimmed
        release_freed_memory(self.device, collect_garbage=False)

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
        self._stop_prefault()  # a cache being replaced
        caches = []
        for layer in get_attention_layers(model):
            shape = layer.backend.get_kv_cache_shape(
                num_blocks, block_size, layer.num_kv_heads, layer.head_size
            )
            # zeros, not empty: padded reads past a sequence's end must stay finite
            caches.append(_zeroed_untouched(shape, dtype, self.device))
        bind_kv_cache(model, caches)
        if KVPrefault.applies_to(caches, num_blocks):  # CPU caches of the usual layout
            tokens = min(self.config.scheduler_config.max_num_batched_tokens, AHEAD_TOKENS)
            # a small cache keeps most of itself untouched until used
            ahead = min(-(-tokens // block_size), max(1, num_blocks // AHEAD_FRACTION_OF))
            if self.config.cache_config.kv_prefault == "all":
                ahead = num_blocks
            self._prefault = KVPrefault(caches, num_blocks, ahead)
        self.config.cache_config.num_blocks = num_blocks
        self.model_runner.initialize_proposer_cache(num_blocks)

    def compile_or_warm_up_model(self) -> None:
        """Run the step shapes the first requests will hit (`engine.worker.warm_up`),
        unless ``compilation_config.warm_up`` is off."""
        if self.config.compilation_config.warm_up:
            self.model_runner.warm_up(self.config.cache_config.num_blocks or 0,
                                      shapes=self.config.compilation_config.warm_up_shapes)
            # the warm-up's largest steps (a long prompt, the widest decode batch)
            # leave freed activations and logits in the heap
            release_freed_memory(self.device, collect_garbage=False)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        out = self.model_runner.execute_model(scheduler_output)
        if self._prefault is not None:
            # the newest blocks come last in their tables, and unused ones in order
            last = [s.block_table[-1] for s in scheduler_output.scheduled if s.block_table]
            if last:
                self._prefault.used(max(last))
        return out

    def _stop_prefault(self) -> None:
        if self._prefault is not None:
            self._prefault.stop()
            self._prefault = None

    # -- sleep mode (docs/sleep-and-warm-up.md) --

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and the weights: level 1 keeps the weights' bytes in
        an unlinked temporary file, level 2 discards them (`wake_up` reloads the
        checkpoint). A deeper sleep while asleep drops the kept file."""
        if self._asleep is not None:
            if level >= 2:
                self._asleep.close()
            return
        from engine.attention import bind_kv_cache, get_attention_layers

        model = self.model_runner.model
        layers = get_attention_layers(model)
        self._stop_prefault()  # before the cache's memory goes
        if layers:
            empty = torch.empty(0, dtype=self.model_runner.dtype, device=self.device)
            bind_kv_cache(model, [empty] * len(layers))
        self._asleep = offload_weights(model, keep=level < 2)
        release_freed_memory(self.device)

    def wake_up(self) -> None:
        """Bring back the weights (from the sleep file, or the checkpoint after
        level 2) and a zeroed KV cache of the same size (no-op when awake)."""
        asleep = self._asleep
        if asleep is None:
            return
        if asleep.file is not None:
            restore_weights(asleep)
            self.model_runner.pack_weights()
        else:
            self.model_runner.load_model()
        self._asleep = None
        num_blocks = self.config.cache_config.num_blocks
        if num_blocks:
            self.initialize_cache(num_blocks)
    def take_draft_token_ids(self) -> Any:
        """The proposals the last step made for the next one (rank 0)."""
        return self.model_runner.take_draft_token_ids()

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        return self.model_runner.embed(token_id_lists)

    # LoRA: the model runner's engine.lora.LoRAModelManager does the work

    def add_lora(self, lora_request: Any) -> bool:
        return self.model_runner.lora_manager().add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.model_runner.lora_manager().remove(lora_id)

    def list_loras(self) -> set[int]:
        return set(self.model_runner.lora_manager().list())

    def pin_lora(self, lora_id: int) -> bool:
        return self.model_runner.lora_manager().pin(lora_id)

    def shutdown(self) -> None:
        self._stop_prefault()
        self.model_runner = None
