"""A speculative-decoding proposer plugin: guess that the last token repeats.

Runs of one token (indentation, separators, a model stuck in a loop) are
common enough that this tiny guess is often right; when it is wrong the target
model's verification throws it away and nothing else changes.

Use it with ``LLM(model, speculative_config={"method": "repeat_last",
"num_speculative_tokens": 3})`` once this package is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.spec_decode import Proposer


class RepeatLastProposer(Proposer):
    """Propose the last token ``num_speculative_tokens`` times, when the sequence
    already ends in a run of at least two of it (otherwise no guess)."""

    def propose(self, seq_ids: Sequence[int],
                token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        k = self.num_speculative_tokens
        return [[t[-1]] * k if len(t) >= 2 and t[-1] == t[-2] else [] for t in token_ids]
