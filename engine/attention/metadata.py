"""The per-step attention metadata shared by every attention backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the paged KV cache.

    The tokens of a step are flattened: sequence i owns rows
    ``query_start_loc[i]:query_start_loc[i + 1]``, and they are the LAST
    ``query_lens[i]`` positions of its ``seq_lens[i]``-token context. So a full
    prefill, a chunk of a long prompt, a prompt after a prefix-cache hit and a
    decode step are all the same case.
    """

    query_lens: list[int]  # new tokens per sequence in this step
    seq_lens: list[int]  # context length per sequence after this step
    query_start_loc: torch.Tensor  # int64 [num_seqs + 1], cumulative query_lens
    seq_lens_tensor: torch.Tensor  # int64 [num_seqs]
    block_tables: torch.Tensor  # int64 [num_seqs, max_blocks], padded with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], block_id * block_size + offset
    block_size: int
    max_query_len: int
    max_seq_len: int
    # what a backend derives once per step and reuses in every layer (masks, indices)
    backend_state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from plain lists (as the model runner has them). Raises
        ValueError when the lists disagree."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError(
                f"query_lens ({len(query_lens)}), seq_lens ({len(seq_lens)}) and "
                f"block_tables ({len(block_tables)}) must have one entry per sequence"
            )
        if len(slot_mapping) != sum(query_lens):
            raise ValueError(
                f"slot_mapping has {len(slot_mapping)} entries, expected one per new "
                f"token ({sum(query_lens)})"
            )
        for i, (q, s, blocks) in enumerate(zip(query_lens, seq_lens, block_tables, strict=True)):
            if not 0 < q <= s or len(blocks) * block_size < s:
                raise ValueError(
                    f"sequence {i}: query_len {q}, seq_len {s} and {len(blocks)} blocks of "
                    f"{block_size} do not fit (need 0 < query_len <= seq_len <= blocks * block_size)"
                )
        max_blocks = max((len(b) for b in block_tables), default=0)
        padded = [b + [0] * (max_blocks - len(b)) for b in block_tables]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        long = dict(dtype=torch.int64, device=device)
        return cls(
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            query_start_loc=torch.tensor(starts, **long),
            seq_lens_tensor=torch.tensor(seq_lens, **long),
            block_tables=torch.tensor(padded, **long).view(len(block_tables), max_blocks),
            slot_mapping=torch.tensor(slot_mapping, **long),
            block_size=block_size,
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )
