"""Checking a step's draft tokens against the target model's logits.

A sequence with ``n`` drafts ``d_0 .. d_{n-1}`` got ``n + 1`` rows of logits: row
``j`` is the target's distribution for the token after ``d_{j-1}`` (row 0: after
the last real token). Greedy sequences keep the drafts that equal the argmax of
their row and then take the argmax of the first row that disagrees (or of the
last row when all agree), so the output is the one plain decoding gives.

Sampled sequences use rejection sampling with the draft treated as certain
(probability 1): ``d_j`` is kept with probability ``p_j(d_j)``; at the first
refusal the token is drawn from ``p_j`` without ``d_j`` (renormalized), which is
what ``max(0, p - q)`` is for a one-point ``q``; when all are kept a last token is
drawn from ``p_n``. Summed over both branches every token keeps exactly its
probability under ``p_j``, so the output distribution is the target's.
Every random number comes from the sequence's own generator when it is seeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sample import Sampler, SamplingState


@dataclass
class VerifiedTokens:
    """Per sampled sequence, in order: the drafts kept and the token after them."""

    accepted: list[list[int]]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None


def sample_with_drafts(sampler: Sampler, logits: torch.Tensor,
                       states: Sequence[SamplingState],
                       drafts: Sequence[Sequence[int]]) -> VerifiedTokens:
    """Sample one step where some sequences carry drafts.

    `logits` holds ``len(drafts[i]) + 1`` consecutive rows for sequence i (one when
    it has none). Sequences without drafts go through `sampler` as usual (its
    logits processors see only them); the others are verified here.
    """
    starts, row = [], 0
    for d in drafts:
        starts.append(row)
        row += len(d) + 1
    if row != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {row} positions")
    plain = [i for i, d in enumerate(drafts) if not d]
    accepted: list[list[int]] = [[] for _ in drafts]
    tokens = [0] * len(drafts)
    logprobs: list[dict[int, float] | None] | None = None
    if plain:
        index = torch.tensor([starts[i] for i in plain], device=logits.device)
        out = sampler(logits.index_select(0, index), [states[i] for i in plain])
        for j, i in enumerate(plain):
            tokens[i] = out.token_ids[j]
        if out.logprobs is not None:
            logprobs = [None] * len(drafts)
            for j, i in enumerate(plain):
                logprobs[i] = out.logprobs[j]
    speculated = [i for i, d in enumerate(drafts) if d]
    greedy = [i for i in speculated if states[i].params.greedy]
    if greedy:
        _verify_greedy(logits, [starts[i] for i in greedy], [drafts[i] for i in greedy],
                       greedy, accepted, tokens)
    random = [i for i in speculated if not states[i].params.greedy]
    if random:
        _verify_random(sampler, logits, starts, drafts, states, random, accepted, tokens)
    return VerifiedTokens(accepted, tokens, logprobs)


def _verify_greedy(logits: torch.Tensor, starts: list[int], drafts: list[Sequence[int]],
                   which: list[int], accepted: list[list[int]], tokens: list[int]) -> None:
    # one argmax over every row (the few rows of sequences without drafts cost
    # less than gathering the others first) and one transfer
    best = Sampler.argmax(logits).tolist()
    for i, start, d in zip(which, starts, drafts, strict=True):
        n = 0
        while n < len(d) and d[n] == best[start + n]:
            n += 1
        accepted[i] = list(d[:n])
        tokens[i] = best[start + n]


def _verify_random(sampler: Sampler, logits: torch.Tensor, starts: list[int],
                   drafts: Sequence[Sequence[int]], states: Sequence[SamplingState],
                   which: list[int], accepted: list[list[int]], tokens: list[int]) -> None:
    rows = [r for i in which for r in range(starts[i], starts[i] + len(drafts[i]) + 1)]
    row_states = [states[i] for i in which for _ in range(len(drafts[i]) + 1)]
    index = torch.tensor(rows, device=logits.device)
    probs = sampler.target_probs(logits.index_select(0, index), row_states)
    at = 0
    for i in which:
        d, state = drafts[i], states[i]
        p = probs[at : at + len(d) + 1]
        at += len(d) + 1
        n = 0
        # the draft probabilities of this sequence in one transfer; the uniforms one
        # at a time, so a seeded sequence draws the same numbers in any batch
        p_draft = p[torch.arange(len(d)), torch.tensor(list(d))].tolist()
        while n < len(d) and float(sampler.uniforms([state], p.device)) < p_draft[n]:
            n += 1
        accepted[i] = list(d[:n])
        weights = p[n : n + 1]
        if n < len(d):
            weights = weights.clone()
            weights[0, d[n]] = 0.0
            if not bool((weights > 0).any()):  # p_j was all on d_j: cannot be refused
                weights = p[n : n + 1]
        tokens[i] = int(sampler.draw(weights, [state])[0])
