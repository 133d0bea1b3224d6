"""`Proposer`: the interface of a speculative-decoding proposer plugin.

A proposer guesses the next few tokens of each sequence cheaply; the target model
then checks all of them in one forward pass (`engine.spec_decode.verify`). The
model runner of the sampling rank owns one proposer and calls, in order:
`load` (after the target model is loaded), `initialize_cache` (after the target's
KV cache is sized), then after each step `propose` for the sequences that may
take drafts, and `remove` for the sequences that finished.

Proposals are checked as if the proposer had put all its probability on them,
which keeps sampling exact whatever the proposer does (even a random one), as
long as its guess does not look at the target's random draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from engine.config import EngineConfig
    from engine.spec_decode.config import SpeculativeConfig


class TokenView(Sequence[int]):
    """A sequence's prompt and output as one read-only sequence of token ids,
    without copying them (the proposer runs after every step)."""

    __slots__ = ("_prompt", "_output")

    def __init__(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self._prompt = prompt
        self._output = output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        n = len(self._prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if start >= stop:
                return []
            if start >= n:
                return list(self._output[start - n : stop - n])
            if stop <= n:
                return list(self._prompt[start:stop])
            return [*self._prompt[start:], *self._output[: stop - n]]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._prompt[i] if i < n else self._output[i - n]


class Proposer:
    """Base of every proposer (plugin group ``spec_proposer``).

    Built as ``cls(spec_config, engine_config, device)`` on the rank that
    samples. `propose` is the one method a subclass must provide.
    """

    def __init__(self, spec_config: SpeculativeConfig, engine_config: EngineConfig,
                 device: torch.device) -> None:
        self.spec_config = spec_config
        self.engine_config = engine_config
        self.device = device
        self.num_speculative_tokens = spec_config.num_speculative_tokens

    @classmethod
    def check_config(cls, spec_config: SpeculativeConfig, engine_config: EngineConfig) -> None:
        """Raise ValueError, at the engine's start, for settings this proposer
        cannot serve. Accepts everything by default."""

    def load(self, target_model: Any) -> None:
        """Load what the proposer needs (a draft model); called once after the
        target model is loaded. Nothing by default."""

    def initialize_cache(self, num_blocks: int) -> None:
        """Called once the target's KV cache holds ``num_blocks`` blocks (a draft
        model sizes its own cache from it). Nothing by default."""

    def propose(self, seq_ids: Sequence[int],
                token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Guess up to ``num_speculative_tokens`` tokens to follow each sequence.

        ``token_ids[i]`` is sequence ``seq_ids[i]``'s prompt and output so far (a
        read-only `TokenView`: index or slice it, ``list()`` it to copy; it only
        ever grows between calls for one sequence).
        Returns one list per sequence, possibly empty (no guess: the sequence
        decodes as without speculation, at no extra cost)."""
        raise NotImplementedError(f"proposer {type(self).__qualname__} does not implement "
                                  "propose()")

    def remove(self, seq_ids: Sequence[int]) -> None:
        """Forget finished sequences (free their draft cache). Nothing by default."""
