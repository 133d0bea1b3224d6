"""`DraftModelProposer`: a smaller model with the target's tokenizer guesses the
next ``num_speculative_tokens`` tokens greedily, one forward per token, with its
own paged KV cache.

Every guess costs a draft forward, kept or not, so each sequence's number of
guesses follows how its last ones fared, as the scheduler's limit does
(`Scheduler._adapt_drafts`): halved when the first was wrong, doubled back (up
to ``num_speculative_tokens``) when all were right.

The draft cache is bookkept with the engine's own `KVCacheManager` (no prefix
caching): each sequence keeps the tokens whose K/V the draft cache holds, and a
proposal first recomputes what changed since (the target's token after a refused
draft), then runs ``k`` single-token steps over every sequence at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any

import torch

from engine.attention import AttentionMetadata, bind_kv_cache, get_attention_layers
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.sequence import Sequence
from engine.quantization import step_rows
from engine.sample import Sampler
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.proposer import Proposer


class DraftModelProposer(Proposer):
    """The built-in ``draft_model`` proposer (``{"model": DRAFT, ...}``)."""

    @classmethod
    def check_config(cls, spec_config: SpeculativeConfig, engine_config: Any) -> None:
        if engine_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError("speculative decoding with a draft model runs with "
                             "tensor_parallel_size=1 only; use method 'ngram' with TP")

    def __init__(self, spec_config: SpeculativeConfig, engine_config: Any,
                 device: torch.device) -> None:
        super().__init__(spec_config, engine_config, device)
        self.model: torch.nn.Module | None = None
        self.kv_cache: KVCacheManager | None = None
        self.block_size = engine_config.cache_config.block_size
        self._seqs: dict[int, Sequence] = {}  # seq_id -> what the draft cache holds
        self.max_positions: int | None = None  # the draft's context: no draft fed past it
        self._want: dict[int, int] = {}  # seq_id -> guesses to make next
        # seq_id -> (the sequence's length when it was last proposed for, the guesses)
        self._last: dict[int, tuple[int, list[int]]] = {}

    def load(self, target_model: Any) -> None:
        """Load the draft model in the target's dtype; its vocabulary must be the
        target's (ValueError otherwise)."""
        from engine.model_loader import load_hf_config, load_model, resolve_dtype
        from engine.model_loader.hf_cache import resolve_model

        target = self.engine_config
        path = resolve_model(self.spec_config.model, None)
        hf_config = load_hf_config(path)
        target_vocab = target.model_config.hf_config.get("vocab_size")
        if target_vocab is not None and hf_config.get("vocab_size") != target_vocab:
            raise ValueError(
                f"speculative_config.model {str(path)!r} has vocab_size "
                f"{hf_config.get('vocab_size')}, the target model {target_vocab}: the draft "
                "model must share the target's tokenizer")
        dtype = str(resolve_dtype(target)).removeprefix("torch.")
        limits = [int(v) for v in (target.model_config.max_model_len,
                                   hf_config.get("max_position_embeddings")) if v]
        self.max_positions = min(limits) if limits else None
        config = dataclasses.replace(
            target,
            model_config=dataclasses.replace(target.model_config, model=str(path),
                                             hf_config=hf_config, dtype=dtype,
                                             load_format="auto"),
        )
        self.model = load_model(config)
        from engine.platforms import current_platform

        if current_platform.is_cpu():
            from engine.ops.linear import pack_linear_weights

            pack_linear_weights(self.model)

    def initialize_cache(self, num_blocks: int) -> None:
        """A draft cache of as many blocks as the target's (each far smaller)."""
        caches = []
        dtype = next(self.model.parameters()).dtype
        for layer in get_attention_layers(self.model):
            shape = layer.backend.get_kv_cache_shape(num_blocks, self.block_size,
                                                     layer.num_kv_heads, layer.head_size)
            caches.append(torch.zeros(shape, dtype=dtype, device=self.device))
        bind_kv_cache(self.model, caches)
        self.kv_cache = KVCacheManager(num_blocks, self.block_size, enable_prefix_caching=False)

    def remove(self, seq_ids: Seq[int]) -> None:
        for seq_id in seq_ids:
            self._want.pop(seq_id, None)
            self._last.pop(seq_id, None)
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                self.kv_cache.free(seq)

    def propose(self, seq_ids: Seq[int], token_ids: Seq[Seq[int]]) -> list[list[int]]:
        running: list[tuple[int, Sequence]] = []  # the sequences that got cache room
        want: dict[int, int] = {}
        for seq_id, tokens in zip(seq_ids, token_ids, strict=True):
            want[seq_id] = self._adapt(seq_id, tokens)
            seq = self._sync(seq_id, tokens)
            num_new = seq.num_tokens - seq.num_computed_tokens
            # room for the catch-up tokens and the drafts fed back
            if self.kv_cache.allocate_slots(seq, num_new + want[seq_id] - 1):
                running.append((seq_id, seq))
            else:
                self.remove([seq_id])
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id, _ in running}
        with torch.inference_mode():
            for step in range(max(want.values(), default=0) if running else 0):
                if step:  # feed the previous draft back, at the next position
                    limit = self.max_positions
                    running = [(i, seq) for i, seq in running if step < want[i]
                               and (limit is None or seq.num_tokens < limit)]
                    if not running:  # every sequence has its guesses or is at the end
                        break
                    for seq_id, seq in running:
                        seq.token_ids.append(drafts[seq_id][-1])
                seqs = [seq for _, seq in running]
                for (seq_id, _), token in zip(running, self._forward(seqs), strict=True):
                    drafts[seq_id].append(token)
        for seq_id, tokens in zip(seq_ids, token_ids, strict=True):
            if seq_id in drafts:
                self._last[seq_id] = (len(tokens), drafts[seq_id])
        return [drafts.get(seq_id, []) for seq_id in seq_ids]

    def _adapt(self, seq_id: int, tokens: Seq[int]) -> int:
        """How many guesses to make for a sequence, from how many of the last ones
        the tokens that followed agree with."""
        want = self._want.get(seq_id, self.num_speculative_tokens)
        last = self._last.pop(seq_id, None)
        if last is not None:
            length, guesses = last
            after = tokens[length : length + len(guesses)]
            right = 0
            while right < len(after) and after[right] == guesses[right]:
                right += 1
            if right == len(guesses):
                want = min(self.num_speculative_tokens, 2 * want)
            elif right == 0:
                want = max(1, want // 2)
        self._want[seq_id] = want
        return want

    def _sync(self, seq_id: int, tokens: Seq[int]) -> Sequence:
        """The draft's record of a sequence, its computed tokens cut back to the
        longest prefix it shares with `tokens` (at least one token left to compute)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = Sequence(f"draft-{seq_id}", list(tokens), 0)
            return seq
        same = 0
        limit = min(seq.num_computed_tokens, len(tokens) - 1)
        old = seq.token_ids
        while same < limit and old[same] == tokens[same]:
            same += 1
        seq.token_ids = list(tokens)
        seq.num_computed_tokens = same
        return seq

    def _forward(self, seqs: list[Sequence]) -> list[int]:
        """Compute each sequence's tokens past its computed ones; returns the greedy
        next token of each."""
        bs = self.block_size
        input_ids, positions, slots, query_lens, seq_lens, tables, last = [], [], [], [], [], [], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(end - start)
            seq_lens.append(end)
            tables.append(seq.block_table)
            last.append(len(input_ids) - 1)
            seq.num_computed_tokens = end
        device = self.device
        md = AttentionMetadata.build(query_lens, seq_lens, tables, slots, bs, device)
        # the k single-token steps are decode rows, as the target's (a quantized
        # draft then rounds them as when each sequence drafts alone)
        with step_rows(md.max_query_len == 1):
            hidden = self.model(torch.tensor(input_ids, device=device),
                                torch.tensor(positions, device=device), md)
            rows = torch.tensor(last, device=device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        return Sampler.argmax(logits).tolist()
