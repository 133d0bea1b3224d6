"""Repetition, presence and frequency penalties, applied in place to logits.

Definitions (as the common engines use them):
- repetition (CTRL-style): for every token in the prompt or the output, a
  positive logit is divided by the penalty and a negative one multiplied by it;
- presence: subtract `presence_penalty` from every token the output contains;
- frequency: subtract `frequency_penalty` times the token's count in the output.

Only the positions of tokens already seen are read and written (gather /
scatter over padded id rows), so the cost follows sequence length, not vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sample._state import SamplingState


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Penalize `logits` [len(states), vocab] in place, row i for `states[i]`."""
    params = [s.params for s in states]
    device, dtype = logits.device, logits.dtype
    outputs = [torch.tensor(s.output_token_ids, dtype=torch.int64) for s in states]

    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        seen = [torch.cat([s.prompt_tensor(), out]) for s, out in zip(states, outputs, strict=True)]
        ids, valid = _padded(seen, device)
        penalty = torch.tensor(rep, dtype=dtype, device=device).unsqueeze(1)
        values = logits.gather(1, ids)
        penalized = torch.where(values > 0, values / penalty, values * penalty)
        # duplicate ids write identical values, so scatter order does not matter
        logits.scatter_(1, ids, torch.where(valid, penalized, values))

    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    if any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres):
        ids, valid = _padded(outputs, device)
        ones = valid.to(dtype)
        counts = torch.zeros_like(logits).scatter_add_(1, ids, ones).gather(1, ids)
        freq_t = torch.tensor(freq, dtype=dtype, device=device).unsqueeze(1)
        pres_t = torch.tensor(pres, dtype=dtype, device=device).unsqueeze(1)
        values = logits.gather(1, ids)
        penalized = values - freq_t * counts - pres_t * (counts > 0).to(dtype)
        logits.scatter_(1, ids, torch.where(valid, penalized, values))


def _padded(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors of different lengths into [n, max_len] and a mask of
    the real entries. Padding repeats a real id of the row (or 0), so gathers
    and scatters through it stay in range."""
    lengths = torch.tensor([len(r) for r in rows])
    width = max(int(lengths.max()), 1)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, :] = row[0]
            ids[i, : len(row)] = row
    valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return ids.to(device), valid.to(device)
