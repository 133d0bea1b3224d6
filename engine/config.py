"""Engine configuration: one dataclass per concern, gathered in `EngineConfig`.

Platforms read and adjust it in `Platform.check_and_update_config(config)`
before anything heavy happens (see "Platform interface" in docs/reference.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    model: str  # Hugging Face-format directory
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    seed: int = 0
    max_model_len: int | None = None  # None: from the model's config.json
    hf_config: dict[str, Any] = field(default_factory=dict)  # parsed config.json
    io_processor_plugin: str | None = None
    load_format: str = "auto"  # a registered model loader (engine.model_loader)
    enable_sleep_mode: bool = False  # LLM.sleep / wake_up (docs/sleep-and-warm-up.md)
    # a quantization plugin's name, "none", or None: GGUF blocks stay as they are
    quantization: str | None = None


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; wins over the fraction when set
    kv_cache_memory_fraction: float = 0.25  # of total system/device memory
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # filled in when the cache is sized
    # what an idle-priority thread pages in ahead of use (engine.worker.kv_prefault):
    # "ahead", a window past the highest block used; "all", the whole cache
    kv_prefault: str = "ahead"


# CacheConfig.kv_prefault's values; EngineArgs also takes "auto" (its default): "all"
# when the cache was given a size (kv_cache_memory), "ahead" when the engine sized it
KV_PREFAULT_MODES = ("ahead", "all")


# how the scheduler orders waiting requests (engine.core.scheduler)
SCHEDULING_POLICIES = ("fcfs", "short-prompt-first")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096  # token budget per step
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: only the step budget chunks prompts
    # order of the waiting requests: "fcfs", or "short-prompt-first" within each
    # group that arrived between two steps (engine.core.scheduler)
    scheduling_policy: str = "fcfs"
    # what one request may ask for: top log-probabilities per token, samples
    max_logprobs: int = 20
    max_n: int = 128


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    worker_cls: str = "auto"  # qualified name; the platform fills in "auto"
    distributed_backend: str | None = None  # None: the platform's choice (gloo / nccl)
    # who runs the ranks: "mp" (local processes), "ray", "external_launcher" (torchrun)
    distributed_executor_backend: str = "mp"


@dataclass
class DeviceConfig:
    device: str = "cpu"  # torch device string, set by the platform


@dataclass
class CompilationConfig:
    # "all" (default), "none", or a list of "+name" / "-name" toggles
    custom_ops: list[str] = field(default_factory=lambda: ["all"])
    # run the step shapes of the first requests at start (engine.worker.warm_up)
    warm_up: bool = True
    # then every prompt-step row bucket and prompt length once (the shape stages;
    # ENGINE_WARM_UP=steps leaves them to the first requests)
    warm_up_shapes: bool = True
    # torch.compile (engine.compilation): a graph_backend plugin name, None: eager
    backend: str | None = None
    dynamic: bool = True
    cache_dir: str | None = None  # None: $ENGINE_COMPILE_CACHE or ~/.cache/engine/compile


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    attention_backend: str | None = None  # user's choice; None: the platform's default
    log_stats: bool = False
    # extra LogitsProcessor classes or "pkg.mod:Cls" names, after the plugins
    logits_processors: list[Any] = field(default_factory=list)
    # speculative decoding: an engine.spec_decode.SpeculativeConfig, None when off
    speculative_config: Any = None
    lora_config: Any = None  # engine.lora.LoRAConfig when enable_lora, else None


_current_config: EngineConfig | None = None


@contextlib.contextmanager
def set_current_engine_config(config: EngineConfig) -> Iterator[EngineConfig]:
    """Make `config` visible to code that builds layers (attention backend choice,
    custom-op toggles) while a model is constructed."""
    global _current_config
    previous, _current_config = _current_config, config
    try:
        yield config
    finally:
        _current_config = previous


def get_current_engine_config() -> EngineConfig | None:
    """The config set by `set_current_engine_config`, or None outside of it."""
    return _current_config
