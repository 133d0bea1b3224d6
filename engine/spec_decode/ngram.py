"""`NgramProposer`: prompt lookup. The last n tokens (n from ``prompt_lookup_max``
down to ``prompt_lookup_min``) are looked up earlier in the prompt and output; the
tokens that followed their latest earlier occurrence are the guess. No match: no
guess, so a text that never repeats itself decodes as without speculation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.spec_decode.proposer import Proposer


def find_ngram_continuation(tokens: Sequence[int] | np.ndarray, min_n: int, max_n: int,
                            k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest
    suffix of `tokens` (between `min_n` and `max_n` tokens long) found again in
    `tokens`; [] when none is."""
    arr = np.asarray(tokens, dtype=np.int64)
    length = len(arr)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = arr[length - n:]
        # candidate starts: every earlier position whose n tokens equal the suffix
        # (the suffix itself, at length - n, excluded)
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            # the latest occurrence that is followed by k tokens (a repeating
            # pattern's latest one overlaps the suffix and has fewer), else the first
            full = hits[hits + n + k <= length]
            start = int(full[-1] if full.size else hits[0]) + n
            return arr[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    """The built-in ``ngram`` proposer (see the module docstring)."""

    def propose(self, seq_ids: Sequence[int],
                token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        cfg = self.spec_config
        return [find_ngram_continuation(t, cfg.prompt_lookup_min, cfg.prompt_lookup_max,
                                        self.num_speculative_tokens) for t in token_ids]
