"""Incremental detokenization and the finish rules of one sequence.

`IncrementalDetokenizer` turns the sampled ids of one sequence into text, one
token at a time, and decides when the sequence is finished. Each step decodes a
short window of ids (the tokens since the last emitted text plus a few before
them, for context such as a word's leading space), so the cost per token does
not grow with the output. Text is only emitted once it ends on a whole
character: a byte-level token that carries half of a multi-byte character is
held back until the rest arrives.

Finish rules, in the order they are checked after each token:
1. EOS (unless `ignore_eos`) -> "stop", stop_reason None;
   a token of `stop_token_ids` -> "stop", stop_reason = that id;
2. a `stop` string in the text -> "stop", stop_reason = that string; the text
   ends right before it (or after it, with `include_stop_str_in_output`);
3. `max_tokens` generated, or the model's context full -> "length".
Rules 1 and 2 wait until `min_tokens` tokens exist. EOS/stop-id tokens stay in
the token ids but not in the text (unless `include_stop_str_in_output`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from engine.sampling_params import SamplingParams
    from engine.tokenizer.tokenizer import Tokenizer

__all__ = ["DetokenizerUpdate", "IncrementalDetokenizer", "StopDecision", "check_stop"]

# Prompt tokens decoded with the first output tokens, so the first word gets
# the spacing it would have in the full text.
_PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class StopDecision:
    """Why a sequence finished: `finish_reason` "stop" or "length";
    `stop_reason` the stop token id or stop string (None for EOS and length)."""

    finish_reason: str
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class DetokenizerUpdate:
    """What one new token changed: the text to stream (may be ""), and whether
    and why the sequence finished."""

    text_delta: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def check_stop(
    output_token_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Collection[int],
    *,
    prompt_len: int = 0,
    max_model_len: int | None = None,
) -> StopDecision | None:
    """Finish rules that need no text: EOS, stop token ids, and length.

    Looks at the last id of `output_token_ids` (the sequence's generated ids so
    far). Returns None while the sequence should go on. `max_model_len` (with
    `prompt_len`) finishes a sequence whose context is full.
    """
    num_output = len(output_token_ids)
    if num_output == 0:
        return None
    last = output_token_ids[-1]
    if num_output >= params.min_tokens:
        if not params.ignore_eos and last in eos_token_ids:
            return StopDecision("stop", None)
        if last in params.stop_token_ids:
            return StopDecision("stop", last)
    if params.max_tokens is not None and num_output >= params.max_tokens:
        return StopDecision("length")
    if max_model_len is not None and prompt_len + num_output >= max_model_len:
        return StopDecision("length")
    return None


class IncrementalDetokenizer:
    """Text and finish state of one generated sequence.

    Call `add(token_id)` for every sampled token (or `update(token_id)` to also
    get the text to stream). `output_text` is the text so far, `token_ids` the
    generated ids.

    Args:
        tokenizer: an `engine.tokenizer.Tokenizer`.
        prompt_token_ids: the prompt; its last few ids give the first output
            token its context (a leading space, say).
        params: the request's `SamplingParams`.
        eos_token_ids: ids that end the sequence (default: the tokenizer's).
        max_model_len: the model's context length; a full context finishes the
            sequence with "length".
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        eos_token_ids: Collection[int] | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_ids = (
            tokenizer.eos_token_ids if eos_token_ids is None else frozenset(eos_token_ids)
        )
        self.max_model_len = max_model_len
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = []
        self.output_text = ""
        self.decision: StopDecision | None = None
        self._sent = 0  # characters of output_text already handed out as deltas
        # stop strings may still be completed by the next tokens: hold back that much
        self._holdback = 0
        if params.stop and not params.include_stop_str_in_output:
            self._holdback = max(len(s) for s in params.stop) - 1

        # ids[prefix:read] is already text; ids[read:] is not emitted yet
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = self._clean_end(self._ids)
        self._prefix_text = self._decode(self._ids[: self._read])

    # ----------------------------------------------------------------- state

    @property
    def finished(self) -> bool:
        return self.decision is not None

    @property
    def finish_reason(self) -> str | None:
        return self.decision.finish_reason if self.decision else None

    @property
    def stop_reason(self) -> int | str | None:
        return self.decision.stop_reason if self.decision else None

    # ------------------------------------------------------------------ steps

    def add(self, token_id: int) -> StopDecision | None:
        """Append one generated token; returns why the sequence finished, or
        None while it goes on.

        Raises:
            RuntimeError: the sequence has already finished.
        """
        if self.decision is not None:
            raise RuntimeError(
                f"sequence already finished ({self.decision.finish_reason}); "
                f"cannot add token {token_id}"
            )
        self.token_ids.append(token_id)
        decision = check_stop(
            self.token_ids,
            self.params,
            self.eos_token_ids,
            prompt_len=self.prompt_len,
            max_model_len=self.max_model_len,
        )
        ends_on_stop_token = decision is not None and decision.finish_reason == "stop"
        if not ends_on_stop_token or self.params.include_stop_str_in_output:
            self._ids.append(token_id)
            old_len = len(self.output_text)
            self._emit(flush=decision is not None)
            if len(self.token_ids) >= self.params.min_tokens:
                decision = self._find_stop_string(old_len) or decision
        if decision is not None:
            if decision.finish_reason != "stop" or not isinstance(decision.stop_reason, str):
                self._emit(flush=True)
            self.decision = decision
        return decision

    def take_delta(self) -> str:
        """The text not handed out before. While the sequence runs, the last
        characters that could still turn out to start a stop string are held
        back; once it finished, everything left is returned."""
        end = len(self.output_text)
        if self.decision is None:
            end -= self._holdback
        if end <= self._sent:
            return ""
        delta = self.output_text[self._sent : end]
        self._sent = end
        return delta

    def update(self, token_id: int) -> DetokenizerUpdate:
        """`add(token_id)` and `take_delta()` in one call."""
        decision = self.add(token_id)
        delta = self.take_delta()
        if decision is None:
            return DetokenizerUpdate(delta, False)
        return DetokenizerUpdate(delta, True, decision.finish_reason, decision.stop_reason)

    # ---------------------------------------------------------------- helpers

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def _clean_end(self, ids: list[int]) -> int:
        """Largest r such that ids[:r] decodes to whole characters (the prompt
        may end inside a character: its rest then belongs to the output)."""
        end = len(ids)
        while end > 0 and self._decode(ids[:end]).endswith(_REPLACEMENT):
            end -= 1
        return end

    def _emit(self, flush: bool) -> None:
        """Move newly decodable text from the id window to output_text."""
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text):
            return
        if text.endswith(_REPLACEMENT) and not flush:
            return  # part of a character: wait for the rest
        self.output_text += text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])

    def _find_stop_string(self, old_len: int) -> StopDecision | None:
        """Cut output_text at the first stop string that the new text completed."""
        text = self.output_text
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            where = text.find(stop, max(0, old_len - len(stop) + 1))
            if where != -1 and (best is None or where < best[0]):
                best = (where, stop)
        if best is None:
            return None
        where, stop = best
        end = where + len(stop) if self.params.include_stop_str_in_output else where
        self.output_text = text[:end]
        return StopDecision("stop", stop)
