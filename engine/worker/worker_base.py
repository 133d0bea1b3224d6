"""`WorkerBase`: what the engine asks of the worker on each rank.

A platform names its worker class in ``config.parallel_config.worker_cls``; the
executor builds it with `engine.executor.build_worker` as ``worker_cls(config=...,
rank=r, local_rank=r, distributed_init_method=...)`` (after the platform's
`import_kernels` and the global seed) and then calls, in order: `init_device`,
`load_model`, `get_supported_tasks`, `get_kv_cache_spec`,
`determine_available_memory`, `initialize_cache`, `compile_or_warm_up_model`,
then `execute_model` once per step (`embed` for embedding models;
`take_draft_token_ids` after it with speculative decoding),
`check_health` when the server asks, `sleep` / `wake_up` when the user asks
(sleep mode), and `shutdown` at the end.

Every method here is one the engine calls; a required one the subclass does not
provide raises `NotImplementedError` naming it and the class, so a missing piece
shows up by name instead of as an AttributeError deep in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.step import DraftTokenIds, ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:  # pragma: no cover
    from engine.config import EngineConfig


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
    """Base of every worker (see "Worker interface" in docs/reference.md)."""

    def __init__(
        self,
        config: EngineConfig,
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

    def compile_or_warm_up_model(self) -> None:
        """Compile or warm up what the first real step would otherwise pay for."""
        raise self._missing("compile_or_warm_up_model")

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one scheduled step; rank 0 returns the step's `ModelRunnerOutput`
        (the other ranks' results are not used)."""
        raise self._missing("execute_model")

    # ------------------------------------------------------------------ optional

    def get_supported_tasks(self) -> tuple[str, ...]:
        """What the loaded model serves: "generate" and/or "embed"."""
        return ("generate",)

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Pooled embeddings of a batch of token-id lists (embedding models)."""
        raise self._missing("embed")

    def sleep(self, level: int = 1) -> None:
        """Sleep mode: free the KV cache and the weights while the engine is idle
        (level 1: keep the weights where `wake_up` finds them fast; level 2:
        discard them, `wake_up` reloads the checkpoint). Needed by
        ``enable_sleep_mode=True``, which checks for it at start-up."""
        raise self._missing("sleep")

    def wake_up(self) -> None:
        """Undo `sleep`: weights back and an empty KV cache of the same size."""
        raise self._missing("wake_up")

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """Speculative decoding: the proposals made during the last `execute_model`
        for the next step (rank 0; other ranks return None). The engine calls it
        after every step when ``speculative_config`` is set; a worker without it
        makes such an engine fail at start-up."""
        raise self._missing("take_draft_token_ids")

    def check_health(self) -> None:
        """Raise when this worker can no longer serve; healthy by default."""

    def shutdown(self) -> None:
        """Release what the worker holds; nothing by default."""


def unimplemented_methods(worker: object, names: tuple[str, ...]) -> list[str]:
    """The methods of `names` that `worker` lacks or leaves as `WorkerBase`'s
    placeholder (picklable: the engine asks every rank through `collective_rpc`)."""
    cls = type(worker)
    return [n for n in names
            if getattr(cls, n, None) is None or getattr(cls, n) is getattr(WorkerBase, n, None)]
