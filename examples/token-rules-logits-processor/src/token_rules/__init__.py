"""Two logits-processor plugins driven by per-request ``extra_args``.

- ``ban_tokens``: ``extra_args={"banned_token_ids": [ids...]}`` — those tokens
  are never sampled for that request.
- ``no_repeat_ngram``: ``extra_args={"no_repeat_ngram_size": n}`` — a token that
  would repeat an n-gram already in the prompt or output is never sampled.

Requests without the key are left alone; while no request in the batch uses a
processor it reports itself argmax-invariant, so all-greedy batches skip it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.sample import AddedRequest, BatchUpdate, LogitsProcessor, apply_batch_update

__all__ = ["BanTokensLogitsProcessor", "NoRepeatNgramLogitsProcessor"]


def _int_list(value: object, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"extra_args[{key!r}] must be a list of non-negative token ids, got {value!r}")
    return list(value)


class BanTokensLogitsProcessor(LogitsProcessor):
    """Sets the logits of each request's ``banned_token_ids`` to -inf."""

    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        self.banned: dict[int, list[int]] = {}  # batch row -> banned ids

    @classmethod
    def validate_params(cls, params) -> None:
        """A malformed list refuses the request before it is queued."""
        extra = params.extra_args or {}
        if "banned_token_ids" in extra:
            _int_list(extra["banned_token_ids"], "banned_token_ids")

    def is_argmax_invariant(self) -> bool:
        # asked every step: while no request in the batch bans anything, greedy
        # batches skip this processor (and the sampler's copy of the logits)
        return not self.banned

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        apply_batch_update(self.banned, batch_update, self._entry)

    @staticmethod
    def _entry(added: AddedRequest) -> list[int] | None:
        extra = added.params.extra_args or {}
        if "banned_token_ids" not in extra:
            return None
        return _int_list(extra["banned_token_ids"], "banned_token_ids") or None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[1]
        for row, ids in self.banned.items():
            logits[row, [i for i in ids if i < vocab]] = -math.inf
        return logits


class NoRepeatNgramLogitsProcessor(LogitsProcessor):
    """Bans every token that would complete an n-gram the request already holds
    (prompt and output together)."""

    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        # batch row -> (n, prompt ids, live output ids)
        self.rows: dict[int, tuple[int, Sequence[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return not self.rows

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        apply_batch_update(self.rows, batch_update, self._entry)

    @classmethod
    def validate_params(cls, params) -> None:
        n = (params.extra_args or {}).get("no_repeat_ngram_size")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"extra_args['no_repeat_ngram_size'] must be an integer >= 1, got {n!r}")

    @staticmethod
    def _entry(added: AddedRequest) -> tuple[int, Sequence[int], list[int]] | None:
        n = (added.params.extra_args or {}).get("no_repeat_ngram_size")
        if n is None:
            return None
        return n, added.prompt_token_ids, added.output_token_ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[1]
        for row, (n, prompt, output) in self.rows.items():
            banned = banned_next_tokens(list(prompt) + output, n)
            logits[row, [t for t in banned if t < vocab]] = -math.inf
        return logits


def banned_next_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """The tokens that, appended to `tokens`, would repeat one of its n-grams."""
    if len(tokens) < n:
        return set()
    if n == 1:
        return set(tokens)
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return {
        tokens[i + n - 1]
        for i in range(len(tokens) - n + 1)
        if tuple(tokens[i:i + n - 1]) == prefix
    }
