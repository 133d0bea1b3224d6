"""`NgramProposer`: prompt lookup. The last n tokens (n from ``prompt_lookup_max``
down to ``prompt_lookup_min``) are looked up earlier in the prompt and output; the
tokens that followed an earlier occurrence are the guess. No match: no guess, so
a text that never repeats itself decodes as without speculation.

The proposer runs after every step, so it must cost next to nothing: each
sequence keeps an index from every n-gram it contains to where it ended, updated
with the step's new tokens only, and a lookup is a dictionary access.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.spec_decode.proposer import Proposer


def _pick(ends: list[int], length: int, k: int) -> int | None:
    """Of an n-gram's end positions (ascending, the last possibly the suffix itself
    at `length`), the latest one followed by k tokens (a repeating pattern's
    latest one overlaps the suffix and has fewer), else the first; None if none."""
    for end in reversed(ends):
        if end < length and end + k <= length:
            return end
    return ends[0] if ends[0] < length else None


def find_ngram_continuation(tokens: Sequence[int], min_n: int, max_n: int,
                            k: int) -> list[int]:
    """Up to `k` tokens that followed an earlier occurrence of the longest suffix
    of `tokens` (between `min_n` and `max_n` tokens long) that occurs earlier;
    [] when none does. The reference the incremental index must agree with."""
    tokens = list(tokens)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        ends = [e for e in range(n, length + 1) if tokens[e - n : e] == suffix]
        end = _pick(ends, length, k)
        if end is not None:
            return tokens[end : end + k]
    return []


class _NgramIndex:
    """Where each n-gram of one sequence ended, for n in [min_n, max_n], and a
    copy of the sequence's tokens (slicing a plain list is the cheapest read)."""

    __slots__ = ("ends", "max_n", "tokens")

    def __init__(self, min_n: int, max_n: int) -> None:
        # longest first: the order lookups try them in
        self.ends: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(max_n, min_n - 1, -1)}
        self.max_n = max_n
        self.tokens: list[int] = []  # the tokens indexed

    def extend(self, tokens: Sequence[int]) -> None:
        """Index the tokens past the ones already indexed (one slice of `tokens`)."""
        own = self.tokens
        start = len(own)
        if len(tokens) <= start:
            return
        own.extend(tokens[start:])
        new_length = len(own)
        for n, table in self.ends.items():
            # the n-grams ending at start + 1 .. new_length (and at n at least)
            for end in range(max(start + 1, n), new_length + 1):
                key = tuple(own[end - n : end])
                ends = table.get(key)
                if ends is None:
                    table[key] = [end]
                else:
                    ends.append(end)

    def propose(self, k: int) -> list[int]:
        own = self.tokens
        length = len(own)
        for n, table in self.ends.items():
            if n >= length:
                continue
            ends = table.get(tuple(own[length - n :]))
            if ends is None:
                continue
            end = _pick(ends, length, k)
            if end is not None:
                return own[end : end + k]
        return []


class NgramProposer(Proposer):
    """The built-in ``ngram`` proposer (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._indexes: dict[int, _NgramIndex] = {}

    def propose(self, seq_ids: Sequence[int],
                token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        cfg = self.spec_config
        k = self.num_speculative_tokens
        out = []
        for seq_id, tokens in zip(seq_ids, token_ids, strict=True):
            index = self._indexes.get(seq_id)
            if index is None or len(tokens) < len(index.tokens):  # new (or rewritten): start over
                index = self._indexes[seq_id] = _NgramIndex(cfg.prompt_lookup_min,
                                                            cfg.prompt_lookup_max)
            index.extend(tokens)
            out.append(index.propose(k))
        return out

    def remove(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._indexes.pop(seq_id, None)
