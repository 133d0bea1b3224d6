"""Choosing the next token: `Sampler` turns a batch of logits into token ids.

One `SamplingState` per running sequence carries its `SamplingParams`, its
prompt and output ids (for penalties) and its own random generator (for seeded,
batch-independent draws).

`LogitsProcessor` is the base class of batch-level logits processors (plugin
group ``logits_processor``, or ``LLM(logits_processors=[...])``); the engine
keeps them informed of the batch with `BatchUpdate`s and runs them before the
sampler. A worker with its own model runner builds its sampler as
``Sampler(build_logits_processors(config, device))`` on the rank that samples.
"""

from engine.sample._sampler import Sampler, SamplerOutput
from engine.sample._state import SamplingState
from engine.sample.logits_processor import (
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    LogitsProcessorError,
    apply_batch_update,
    build_logits_processors,
    logits_processor_classes,
)

__all__ = [
    "AddedRequest",
    "BatchUpdate",
    "LogitsProcessor",
    "LogitsProcessorError",
    "Sampler",
    "SamplerOutput",
    "SamplingState",
    "apply_batch_update",
    "build_logits_processors",
    "logits_processor_classes",
]
