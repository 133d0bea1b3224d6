"""The sampler: logits [num_seqs, vocab] -> one token id per sequence.

Rows are grouped by what they need, so the common cases stay cheap: an
all-greedy batch without penalties is one argmax; penalties, min_tokens masks,
top-k/top-p/min-p and log-probabilities only touch the rows that ask for them.

Random rows are sampled by inverse CDF: one uniform number per row and step,
drawn from the row's own generator when the request is seeded, so a seeded
request's tokens do not depend on the rest of the batch. Top-k, top-p and min-p
become one logit threshold per row (values-only sort; CPU sorts go through
numpy, faster there than torch's sort-with-indices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kernels import usable_for
from engine.sample._penalties import apply_penalties
from engine.sample._state import SamplingState
from engine.sample.logits_processor import (
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    LogitsProcessorError,
)
from engine.sampling_params import SamplingParams

# Up to this k, top-k alone uses torch.topk instead of a full sort.
_TOPK_DIRECT_LIMIT = 256
# Vocabulary chunk of the two-level inverse-CDF search.
_CDF_CHUNK = 256


@dataclass
class SamplerOutput:
    """One sampled token per sequence, in the order of the states passed in.

    `logprobs[i]` maps token id -> log-probability for sequence i: its
    `params.logprobs` most likely tokens plus the sampled one; None for a
    sequence that did not ask. `logprobs` itself is None when no sequence asked.
    """

    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None = None


class Sampler:
    """Turns a batch of logits into next tokens.

    Log-probabilities are those of the distribution the token was drawn from:
    after penalties, temperature and top-k/top-p/min-p (masked tokens get
    -inf). For greedy sequences: after penalties, at temperature 1.

    The sampler keeps one float32 workspace as large as the biggest batch of
    logits it has seen (reused each step: a fresh buffer per step costs page
    faults); the per-sequence random state lives in the `SamplingState`s.

    `logits_processors` (``[(name, processor)]``) run first, on the float32
    copy of the logits, before penalties; they are told of every change of the
    batch (a state object is one request's row). A processor that raises makes
    the call raise `LogitsProcessorError` naming it.
    """

    def __init__(self, logits_processors: Sequence[tuple[str, LogitsProcessor]] = ()) -> None:
        self._workspace: torch.Tensor | None = None
        self._processors = _ProcessorPipeline(logits_processors) if logits_processors else None

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """Sample one token per row of `logits` [len(states), vocab].

        `logits` is not modified. Raises ValueError when the row count and the
        number of states differ.
        """
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(states)} sampling states"
            )
        pipeline = self._processors
        if pipeline is not None:
            pipeline.update_state(states)
        if not states:
            return SamplerOutput([])
        plain_greedy = all(_plain_greedy(s) for s in states)
        if plain_greedy and (pipeline is None or pipeline.argmax_invariant):
            return SamplerOutput(_argmax(logits).tolist())

        x = self._copy_to_workspace(logits)
        if pipeline is not None:
            pipeline.apply(x, greedy_only=plain_greedy)
        if plain_greedy:
            return SamplerOutput(_argmax(x).tolist())
        _apply_penalties_and_blocks(x, states)
        num_seqs = len(states)
        token_ids = torch.empty(num_seqs, dtype=torch.int64, device=x.device)
        logprob_rows: dict[int, torch.Tensor] = {}  # row -> log-probs it was drawn from
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        random = [i for i, s in enumerate(states) if not s.params.greedy]
        if greedy:
            index = _index(greedy, x.device)
            sub = x if len(greedy) == num_seqs else x[index]
            token_ids[index] = _argmax(sub)
            logprob_rows.update(_log_softmax_rows(sub, greedy, states))
        if random:
            index = _index(random, x.device)
            sub = x if len(random) == num_seqs else x[index]
            token_ids[index], rows = _sample(sub, random, states)
            logprob_rows.update(rows)

        tokens = token_ids.tolist()
        return SamplerOutput(tokens, _logprobs(states, tokens, logprob_rows))

    # ------------------------------------------------- speculative decoding

    @staticmethod
    def argmax(logits: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row of `logits` [rows, vocab], as plain
        decoding picks it (same ties, any float dtype)."""
        return _argmax(logits)

    def target_probs(self, logits: torch.Tensor,
                     states: Sequence[SamplingState]) -> torch.Tensor:
        """The distribution each row of `logits` [len(states), vocab] would be
        sampled from (penalties, temperature, top-k/top-p/min-p applied), as
        float32 probabilities. A state may stand for several rows (one per
        position of a speculated sequence); logits processors do not run here."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(states)} sampling states"
            )
        x = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        _apply_penalties_and_blocks(x, states)
        _apply_temperature_and_truncation(x, [s.params for s in states])
        return x.softmax(dim=-1)

    def draw(self, weights: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """One token per row of the unnormalized, non-negative `weights`
        [len(states), vocab], by inverse CDF with each state's own generator
        (seeded requests stay deterministic)."""
        return _inverse_cdf(weights, _uniforms(states, weights.device))

    def uniforms(self, states: Sequence[SamplingState], device: torch.device) -> torch.Tensor:
        """One U[0, 1) number per state [len(states), 1], from its own generator
        when it has one."""
        return _uniforms(states, device)

    def _copy_to_workspace(self, logits: torch.Tensor) -> torch.Tensor:
        needed = logits.numel()
        ws = self._workspace
        if ws is None or ws.numel() < needed or ws.device != logits.device:
            ws = self._workspace = torch.empty(needed, dtype=torch.float32, device=logits.device)
        x = ws[:needed].view(logits.shape)
        x.copy_(logits)
        return x


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of [rows, vocab] logits in any float dtype (the
    float32 conversion is exact, so the index is the same): the compiled row kernel
    (engine.kernels; same ties and NaN rule, one pass over the row, vectorised)
    where it is loaded, else torch's."""
    if x.dim() == 2 and x.shape[1] and x.is_contiguous() and usable_for(x):
        return torch.ops.engine_kernels.argmax_rows(x)
    # torch's argmax is slower in bfloat16/float16 than a conversion and a float32 one
    return (x if x.dtype == torch.float32 else x.float()).argmax(dim=-1)


class _ProcessorPipeline:
    """The logits processors of one sampler, and the batch order they last saw."""

    def __init__(self, processors: Sequence[tuple[str, LogitsProcessor]]) -> None:
        self.processors = list(processors)
        self._rows: list[SamplingState] = []  # the batch of the previous step, by row

    @property
    def argmax_invariant(self) -> bool:
        """Asked every step, after `update_state`: a processor may leave the greedy
        choice alone only while no request in the batch uses it."""
        return all(self._call(name, p.is_argmax_invariant) for name, p in self.processors)

    def update_state(self, states: Sequence[SamplingState]) -> None:
        update = _batch_update(self._rows, states)
        # remember the new order first: after a failure the next step's update
        # still starts from what the processors were last told
        self._rows = list(states)
        for name, processor in self.processors:
            self._call(name, processor.update_state, update)

    def apply(self, x: torch.Tensor, greedy_only: bool) -> None:
        """Run the processors on `x` in place (skipping argmax-invariant ones
        when every row is greedy)."""
        for name, processor in self.processors:
            if greedy_only and self._call(name, processor.is_argmax_invariant):
                continue
            out = self._call(name, processor.apply, x)
            if out is x:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise LogitsProcessorError(
                    name, f"apply() returned {shape}, expected a tensor of shape {tuple(x.shape)}"
                )
            x.copy_(out)

    @staticmethod
    def _call(name: str, fn, *args):
        try:
            return fn(*args)
        except LogitsProcessorError:
            raise
        except Exception as exc:
            raise LogitsProcessorError(name, f"{type(exc).__name__}: {exc}") from exc


def _batch_update(
    previous: Sequence[SamplingState], states: Sequence[SamplingState]
) -> BatchUpdate | None:
    """The removals, swaps and additions that turn the row order `previous`
    into `states` (a state object is one request); None when they are equal."""
    if len(previous) == len(states) and all(a is b for a, b in zip(previous, states, strict=True)):
        return None
    target = {id(s): i for i, s in enumerate(states)}
    removed = tuple(i for i, s in enumerate(previous) if id(s) not in target)
    rows: list[SamplingState | None] = [s if id(s) in target else None for s in previous]
    rows += [None] * (len(states) - len(rows))
    where = {id(s): i for i, s in enumerate(rows) if s is not None}
    moved = []
    for i, state in enumerate(states):
        j = where.get(id(state))
        if j is None or j == i:
            continue
        other = rows[i]
        rows[i], rows[j] = state, other
        where[id(state)] = i
        if other is not None:
            where[id(other)] = j
        moved.append((j, i))
    added = tuple(
        AddedRequest(i, s.params, s.prompt_token_ids, s.output_token_ids)
        for i, s in enumerate(states)
        if rows[i] is not s
    )
    return BatchUpdate(len(states), removed, tuple(moved), added)


def _plain_greedy(state: SamplingState) -> bool:
    p = state.params
    return (p.greedy and not p.has_penalties and p.logprobs is None and p.logit_bias is None
            and not state.blocks_stop_tokens)


def _apply_penalties_and_blocks(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Penalties, then each sequence's logit_bias, then -inf for EOS/stop ids of
    sequences still short of min_tokens."""
    penalized = [i for i, s in enumerate(states) if s.params.has_penalties]
    if len(penalized) == len(states):
        apply_penalties(x, states)
    elif penalized:
        index = _index(penalized, x.device)
        sub = x[index]
        apply_penalties(sub, [states[i] for i in penalized])
        x[index] = sub
    for i, s in enumerate(states):
        if s.logit_bias is not None:
            x[i].index_add_(0, *s.logit_bias)
        if s.blocks_stop_tokens:
            ids = [t for t in s.min_tokens_blocked_ids if t < x.shape[1]]
            x[i, ids] = -math.inf


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _log_softmax_rows(
    x: torch.Tensor, rows: list[int], states: Sequence[SamplingState]
) -> dict[int, torch.Tensor]:
    """{rows[j]: log_softmax(x[j])} for the rows whose request wants logprobs."""
    wanted = [j for j, i in enumerate(rows) if states[i].params.logprobs is not None]
    if not wanted:
        return {}
    values = x[_index(wanted, x.device)].log_softmax(dim=-1)
    return {rows[j]: values[k] for k, j in enumerate(wanted)}


# ------------------------------------------------------------------ random rows


def _sample(
    x: torch.Tensor, rows: list[int], states: Sequence[SamplingState]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Draw one token per row of `x` [len(rows), vocab]; `x` is modified.

    `rows[j]` is the batch row (index into `states`) of `x[j]`. Returns the
    tokens and, for rows that want them, the log-probs they were drawn from.
    """
    mine = [states[i] for i in rows]
    _apply_temperature_and_truncation(x, [s.params for s in mine])
    logprob_rows = _log_softmax_rows(x, rows, states)
    # softmax, not exp: this torch's CPU exp crawls on underflowing inputs
    return _inverse_cdf(x.softmax(dim=-1), _uniforms(mine, x.device)), logprob_rows


def _apply_temperature_and_truncation(x: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Divide each row of `x` by its temperature, then mask what top-k, top-p and
    min-p drop (in place)."""
    temperatures = [p.temperature for p in params]
    if any(t != 1.0 for t in temperatures):
        x.div_(torch.tensor(temperatures, device=x.device).unsqueeze(1))
    _truncate_top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
    _truncate_min_p(x, [p.min_p for p in params])


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token i with cdf[i-1] <= u * total < cdf[i] for the
    unnormalized `weights` [n, vocab] and `u` [n, 1] in [0, 1].

    A flat cumsum over the vocabulary is a slow sequential scan on CPU, so the
    search runs in two levels: chunk sums first, then a cumsum inside the one
    chunk the target falls in.
    """
    n, vocab = weights.shape
    chunk = min(_CDF_CHUNK, vocab)
    full = vocab // chunk
    sums = weights[:, : full * chunk].view(n, full, chunk).sum(dim=-1)
    if full * chunk < vocab:
        sums = torch.cat([sums, weights[:, full * chunk :].sum(dim=-1, keepdim=True)], dim=1)
    chunk_cdf = sums.cumsum(dim=-1)
    target = u * chunk_cdf[:, -1:]
    picked = torch.searchsorted(chunk_cdf, target, right=True).clamp_(max=sums.shape[1] - 1)
    below = torch.where(picked > 0, chunk_cdf.gather(1, (picked - 1).clamp_(min=0)), 0.0)

    columns = picked * chunk + torch.arange(chunk, device=weights.device)
    inside = columns < vocab
    local = weights.gather(1, columns.clamp_(max=vocab - 1)) * inside
    offset = torch.searchsorted(local.cumsum(dim=-1), target - below, right=True)
    tokens = columns.gather(1, offset.clamp_(max=chunk - 1))
    # float rounding at a chunk edge can land on a zero weight: take the last
    # positive one before it instead
    zero = weights.gather(1, tokens) == 0
    if zero.any():
        rows = zero.squeeze(1)
        positive = weights[rows] > 0
        positive &= torch.arange(vocab, device=weights.device) <= tokens[rows]
        last = vocab - 1 - positive.flip(-1).to(torch.int8).argmax(dim=-1, keepdim=True)
        tokens[rows] = last
    return tokens.squeeze(1)


def _uniforms(states: Sequence[SamplingState], device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row: the row's own generator when seeded."""
    u = torch.rand(len(states), 1, device=device)
    for i, s in enumerate(states):
        if s.generator is not None:
            u[i] = torch.rand(1, generator=s.generator, device=s.generator.device).to(device)
    return u


def _truncate_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """Set to -inf every logit outside its row's top-k and then top-p nucleus
    (top-p is measured on the top-k renormalized distribution)."""
    vocab = x.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    rows = [i for i in range(len(ks)) if ks[i] < vocab or top_p[i] < 1.0]
    if not rows:
        return
    device = x.device
    index = _index(rows, device)
    sub = x if len(rows) == x.shape[0] else x[index]
    k = torch.tensor([ks[i] for i in rows], device=device).unsqueeze(1)
    if all(top_p[i] >= 1.0 for i in rows) and max(ks[i] for i in rows) <= _TOPK_DIRECT_LIMIT:
        values = sub.topk(int(k.max()), dim=-1).values
        threshold = values.gather(1, k - 1)
    else:
        ordered = _sort_descending(sub)
        ordered.masked_fill_(torch.arange(vocab, device=device) >= k, -math.inf)
        p = torch.tensor([top_p[i] for i in rows], device=device).unsqueeze(1)
        # the nucleus ends at the sorted position where the cumulative mass reaches p
        last = _inverse_cdf(ordered.softmax(dim=-1), p).unsqueeze(1)
        threshold = ordered.gather(1, torch.minimum(last, k - 1))
    _mask_below(x, index, sub, threshold)


def _truncate_min_p(x: torch.Tensor, min_p: list[float]) -> None:
    """Drop tokens whose probability is below min_p times the row's top one."""
    rows = [i for i, m in enumerate(min_p) if m > 0.0]
    if not rows:
        return
    index = _index(rows, x.device)
    sub = x if len(rows) == x.shape[0] else x[index]
    log_min_p = torch.tensor([math.log(min_p[i]) for i in rows], device=x.device).unsqueeze(1)
    threshold = sub.amax(dim=-1, keepdim=True) + log_min_p
    _mask_below(x, index, sub, threshold)


def _mask_below(
    x: torch.Tensor, index: torch.Tensor, sub: torch.Tensor, threshold: torch.Tensor
) -> None:
    """x[index] = sub with -inf where sub < threshold (row-wise); in place when
    `sub` is all of `x`."""
    if sub is x:
        x.masked_fill_(x < threshold, -math.inf)
    else:
        x[index] = sub.masked_fill_(sub < threshold, -math.inf)


def _sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first (values only, no indices)."""
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[:, ::-1]))
    return x.sort(dim=-1, descending=True).values


# -------------------------------------------------------------------- logprobs


def _logprobs(
    states: Sequence[SamplingState], tokens: list[int], rows: dict[int, torch.Tensor]
) -> list[dict[int, float] | None] | None:
    """Top `params.logprobs` entries plus the sampled token, per wanting row."""
    if not rows:
        return None
    order = sorted(rows)
    table = torch.stack([rows[i] for i in order])  # [wanting, vocab]
    chosen = torch.tensor([tokens[i] for i in order], device=table.device).unsqueeze(1)
    chosen_values = table.gather(1, chosen).squeeze(1).tolist()
    widest = min(max(states[i].params.logprobs for i in order), table.shape[1])
    top_values, top_ids = table.topk(widest, dim=-1) if widest else (table[:, :0],) * 2
    top_values, top_ids = top_values.tolist(), top_ids.tolist()

    result: list[dict[int, float] | None] = [None] * len(states)
    for j, i in enumerate(order):
        n = states[i].params.logprobs
        entry = dict(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        entry.setdefault(tokens[i], chosen_values[j])
        result[i] = entry
    return result
