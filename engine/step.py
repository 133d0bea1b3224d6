"""The data of one engine step, crossing the executor/worker boundary.

The scheduler builds a `SchedulerOutput`; the executor hands it to every rank's
worker (`WorkerBase.execute_model`), whose model runner answers with a
`ModelRunnerOutput`. Both are plain picklable data (lists, ints, dicts), so a
worker may live in another process; this module imports nothing heavy so
scheduler, executor and worker can all share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams

__all__ = ["DraftTokenIds", "ModelRunnerOutput", "NewSequenceData", "ScheduledSequence",
           "SchedulerOutput"]


@dataclass
class NewSequenceData:
    """What a worker keeps about a sequence it sees for the first time."""

    seq_id: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed_offset: int  # the sample's index within its request: n samples, n streams
    eos_token_ids: list[int] = field(default_factory=list)  # blocked until min_tokens
    lora_request: LoRARequest | None = None  # the sequence's adapter; None: the base model


@dataclass
class ScheduledSequence:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: list[int]  # the tokens to compute in this step
    num_computed_tokens: int  # position of the first of them
    block_table: list[int]
    sample: bool  # the step reaches the sequence's end: sample its next token
    # speculative decoding: the last `num_draft_tokens` of `token_ids` are drafts to verify
    num_draft_tokens: int = 0


@dataclass
class SchedulerOutput:
    """One step as the scheduler planned it: what every worker computes."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    new_seqs: list[NewSequenceData] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # workers drop their state
    num_batched_tokens: int = 0
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        """True when no sequence is scheduled (nothing for the workers to run)."""
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """Sampled tokens, in the order of the scheduled sequences that asked for one."""

    seq_ids: list[int] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float] | None] | None = None
    # speculative decoding: per sampled sequence, the drafts it kept, which come
    # before its sampled token (None: no drafts were scheduled)
    accepted_token_ids: list[list[int]] | None = None
    # sequences whose logits were not finite (NaN or infinite) at their sampled row:
    # their token is meaningless and the engine ends them with an error
    nonfinite_seq_ids: list[int] | None = None


@dataclass
class DraftTokenIds:
    """Speculative decoding: proposals for the next step, from
    `WorkerBase.take_draft_token_ids`. ``draft_token_ids[i]`` guesses the tokens that
    follow sequence ``seq_ids[i]``'s last one (an empty list: no guess)."""

    seq_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[list[int]] = field(default_factory=list)
