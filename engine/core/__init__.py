"""The engine's runtime core: sequences, the KV-cache block manager, the
scheduler and the engine loop that ties them to an executor."""

from engine.core.kv_cache_manager import KVCacheBlock, KVCacheManager
from engine.core.scheduler import (
    ModelRunnerOutput,
    NewSequenceData,
    ScheduledSequence,
    Scheduler,
    SchedulerOutput,
)
from engine.core.sequence import Sequence, SequenceStatus

__all__ = [
    "KVCacheBlock",
    "KVCacheManager",
    "ModelRunnerOutput",
    "NewSequenceData",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
]
