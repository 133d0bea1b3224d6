"""`WorkerBase`: what the engine asks of the worker on each rank.

A platform names its worker class in ``config.parallel_config.worker_cls``; the
executor builds it as ``worker_cls(config=..., rank=r, local_rank=r,
distributed_init_method=...)`` and then calls, in order: `init_device`,
`load_model`, `get_kv_cache_spec`, `determine_available_memory`,
`initialize_cache` (or `initialize_from_config`), `compile_or_warm_up_model`,
then `execute_model` once per step, and `shutdown` at the end.

Every method the engine may call exists here; one the subclass does not provide
raises `NotImplementedError` naming it and the class, so a missing piece shows
up by name instead of as an AttributeError deep in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one KV-cache block, summed over the model's attention layers."""

    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int  # per layer and tensor-parallel rank
    head_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    page_size_bytes: int  # bytes of one block over all layers (K and V)


class WorkerBase:
    """Base of every worker (SPEC section 7)."""

    def __init__(
        self,
        config: Any,
        rank: int = 0,
        local_rank: int = 0,
        distributed_init_method: str | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.local_rank = local_rank
        self.distributed_init_method = distributed_init_method

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"worker class {type(self).__qualname__} does not implement {method}(), "
            "which the engine needs"
        )

    # ------------------------------------------------------------------ required

    def init_device(self) -> None:
        """Pick and prepare this rank's device; join the distributed group."""
        raise self._missing("init_device")

    def load_model(self) -> None:
        """Build the model and load its weights onto the device."""
        raise self._missing("load_model")

    def get_kv_cache_spec(self) -> KVCacheSpec | None:
        """The per-block cache layout, or None for a model with no KV cache."""
        raise self._missing("get_kv_cache_spec")

    def determine_available_memory(self) -> int:
        """Bytes this rank can give to the KV cache."""
        raise self._missing("determine_available_memory")

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` KV-cache blocks and bind them to the model."""
        raise self._missing("initialize_cache")

    def initialize_from_config(self, kv_cache_config: dict[str, Any]) -> None:
        """Allocate the cache from a dict with at least ``num_blocks``; by default
        the same as `initialize_cache`."""
        self.initialize_cache(int(kv_cache_config["num_blocks"]))

    def compile_or_warm_up_model(self) -> None:
        """Compile or warm up what the first real step would otherwise pay for."""
        raise self._missing("compile_or_warm_up_model")

    def execute_model(self, scheduler_output: Any) -> Any:
        """Run one scheduled step; returns a `ModelRunnerOutput` (rank 0's is used)."""
        raise self._missing("execute_model")

    # ------------------------------------------------------------------ optional

    def get_supported_tasks(self) -> tuple[str, ...]:
        """What the loaded model serves: "generate" and/or "embed"."""
        return ("generate",)

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Pooled embeddings of a batch of token-id lists (embedding models)."""
        raise self._missing("embed")

    def sleep(self, level: int = 1) -> None:
        raise self._missing("sleep")

    def wake_up(self, tags: list[str] | None = None) -> None:
        raise self._missing("wake_up")

    def take_draft_token_ids(self) -> Any:
        raise self._missing("take_draft_token_ids")

    def add_lora(self, lora_request: Any) -> bool:
        raise self._missing("add_lora")

    def remove_lora(self, lora_id: int) -> bool:
        raise self._missing("remove_lora")

    def list_loras(self) -> set[int]:
        raise self._missing("list_loras")

    def pin_lora(self, lora_id: int) -> bool:
        raise self._missing("pin_lora")

    def execute_dummy_batch(self) -> None:
        raise self._missing("execute_dummy_batch")

    def check_health(self) -> None:
        """Raise when this worker can no longer serve; healthy by default."""

    def shutdown(self) -> None:
        """Release what the worker holds; nothing by default."""
