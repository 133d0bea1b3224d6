"""The engine's runtime core: sequences, the KV-cache block manager, the
scheduler and the engine loop that ties them to an executor."""

from engine.core.kv_cache_manager import KVCacheBlock, KVCacheManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.step import (
    ModelRunnerOutput,
    NewSequenceData,
    ScheduledSequence,
    SchedulerOutput,
)

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
