"""Choosing the next token: `Sampler` turns a batch of logits into token ids.

One `SamplingState` per running sequence carries its `SamplingParams`, its
prompt and output ids (for penalties) and its own random generator (for seeded,
batch-independent draws).
"""

from engine.sample._sampler import Sampler, SamplerOutput
from engine.sample._state import SamplingState

__all__ = ["Sampler", "SamplerOutput", "SamplingState"]
