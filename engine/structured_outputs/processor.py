"""`StructuredOutputsLogitsProcessor`: the token mask of structured outputs,
applied through the logits-processor path (see `engine.structured_outputs.grammar`)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import EngineConfig
from engine.sample.logits_processor import (
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    apply_batch_update,
)
from engine.structured_outputs.grammar import compile_grammar
from engine.tokenizer import load_tokenizer
from engine.utils import first_line

__all__ = ["StructuredOutputsLogitsProcessor"]

_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def ll_tokenizer(model: str, vocab_size: int) -> Any:
    """llguidance's view of the model's tokenizer (building it scans the whole
    vocabulary once, so it is cached per model); `vocab_size` 0: the tokenizer's."""
    from llguidance import LLTokenizer

    tokenizer = load_tokenizer(model)
    return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size or None,
                       eos_token=sorted(tokenizer.eos_token_ids))


@dataclass
class _Row:
    matcher: Any
    output_token_ids: list[int]  # the engine's live list
    consumed: int = 0  # tokens of output_token_ids the matcher has seen


class StructuredOutputsLogitsProcessor(LogitsProcessor):
    """Masks the logits of requests with ``SamplingParams.structured_outputs`` to
    the tokens their grammar allows next; rows without it are left alone."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self._rows: dict[int, _Row] = {}
        hf_config = config.model_config.hf_config
        vocab = hf_config.get("vocab_size") or (hf_config.get("text_config") or {}).get(
            "vocab_size")
        self._vocab_size = int(vocab) if vocab else 0  # 0: the tokenizer's size
        self._bitmask: torch.Tensor | None = None

    @classmethod
    def validate_params(cls, params: Any) -> None:
        """Compile the request's grammar again before it is queued:
        `StructuredOutputsParams` checks itself when built, but a dataclass can be
        changed afterwards, and a grammar that fails at the step would stop every
        request of that step. Raises ValueError naming the field."""
        from engine.sampling_params import StructuredOutputsParams

        structured = getattr(params, "structured_outputs", None)
        if structured is None:
            return
        if not isinstance(structured, StructuredOutputsParams):
            raise ValueError("SamplingParams.structured_outputs must be a "
                             f"StructuredOutputsParams or None, got {type(structured).__name__}")
        structured.__post_init__()  # every check of construction, the compile included

    def is_argmax_invariant(self) -> bool:
        # true while no request in the batch is constrained: all-greedy batches
        # then skip the processor (and the sampler's copy of the logits)
        return not self._rows

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        apply_batch_update(self._rows, batch_update, self._new_row)

    def _new_row(self, added: AddedRequest) -> _Row | None:
        params = getattr(added.params, "structured_outputs", None)
        if params is None:
            return None
        from llguidance import LLMatcher

        tokenizer = ll_tokenizer(self.config.model_config.model, self._vocab_size)
        # the engine checked the constraint before queueing the request; should the
        # matcher still fail, `apply` ends this request alone (and the engine, which
        # follows the same grammar, reports it): raising here would fail the step
        matcher = LLMatcher(tokenizer, compile_grammar(params), log_level=0)
        # a request added again (after preemption) already has output tokens
        return _Row(matcher, added.output_token_ids)

    def _ll_vocab_size(self) -> int:
        return ll_tokenizer(self.config.model_config.model, self._vocab_size).vocab_size

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        words = (self._ll_vocab_size() + 31) // 32
        rows = sorted(self._rows)
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = torch.empty((max(len(rows), 8), words), dtype=torch.int32)
        bitmask = self._bitmask[: len(rows)]
        for k, index in enumerate(rows):
            row = self._rows[index]
            new = row.output_token_ids[row.consumed:]
            if new:
                row.matcher.consume_tokens(new)
                row.consumed += len(new)
            mask_row = bitmask[k]
            if row.matcher.is_error():
                # an llguidance limit met midway: end the request rather than fail
                # every request of the step; the engine's own matcher rejects the
                # end-of-sequence too, so the request finishes "error", not "stop"
                _log.warning("structured outputs: %s; ending the request",
                             first_line(row.matcher.get_error()))
                mask_row.zero_()
                for eos in ll_tokenizer(self.config.model_config.model,
                                         self._vocab_size).eos_tokens:
                    mask_row[eos // 32] |= _bit(eos % 32)
                continue
            # row by row: llguidance's thread pool (LLExecutor) measured slower on a
            # busy 2-core machine (docs/benchmarks.md, "Structured outputs")
            row.matcher.unsafe_compute_mask_ptr(mask_row.data_ptr(), words * 4)
        allowed = _unpack_bits(bitmask, logits.shape[1])
        if len(rows) == 1:
            logits[rows[0]].masked_fill_(~allowed[0].to(logits.device), float("-inf"))
            return logits
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        sub = logits.index_select(0, index)
        sub.masked_fill_(~allowed.to(logits.device), float("-inf"))
        logits.index_copy_(0, index, sub)
        return logits


def _bit(j: int) -> int:
    """Bit j of an int32 word, as a signed value (bit 31 is negative)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


_SHIFTS = torch.arange(32, dtype=torch.int32)


def _unpack_bits(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 bitmask (bit j of word w: token 32*w + j) -> [rows, vocab]
    bool; tokens past the bitmask (logits wider than the grammar's vocabulary)
    are not allowed."""
    rows = bitmask.shape[0]
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(rows, -1).bool()
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    pad = torch.zeros((rows, vocab - allowed.shape[1]), dtype=torch.bool)
    return torch.cat([allowed, pad], dim=1)
