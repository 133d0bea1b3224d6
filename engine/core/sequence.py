"""One sequence of tokens moving through the engine.

A request with ``n`` samples becomes ``n`` sequences sharing one prompt. The
scheduler alone changes a sequence's status and computed-token count; the
KV-cache manager alone changes its block table.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        """"stop" | "length" | "abort" | "error" once finished, else None."""
        return self.value if self.is_finished else None


_seq_ids = itertools.count()


class Sequence:
    """Tokens (prompt + generated) and where the engine is with them.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the tokens
    after it are what the next step must compute. A decode step computes the one
    token sampled last; a (chunked) prefill computes a slice of the prompt; after
    a preemption the count drops to zero and the whole sequence is recomputed.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        sampling_params: Any = None,
        index: int = 0,
        parent: Sequence | None = None,
        arrival_time: float | None = None,
        lora_request: Any = None,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.sampling_params = sampling_params
        # the request's first sample: its prefill fills the prefix cache for the rest
        self.parent = parent
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_step = 0  # the scheduler's step count when it was added
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1: not yet
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of the cached full blocks
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # speculative decoding: the proposer's guess of the next tokens, for the next step
        self.spec_token_ids: list[int] = []
        # how many drafts the next step may verify (0: num_speculative_tokens, not
        # yet adapted), and, after single drafts were refused, how many steps go
        # without drafts (doubling while refusals go on): guesses that keep
        # failing cost a verification each, for nothing (Scheduler._adapt_drafts)
        self.spec_limit = 0
        self.spec_backoff = 0
        self.spec_wait = 0
        self.lora_request = lora_request  # engine.lora.LoRARequest, None: the base model

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, "
            f"status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def drop_last_tokens(self, n: int) -> None:
        """Forget the last `n` tokens of a finished sequence: those a speculative
        step produced after the one it stopped at."""
        assert self.is_finished and 0 <= n <= self.num_output_tokens, (self, n)
        if n:
            del self.token_ids[-n:]
