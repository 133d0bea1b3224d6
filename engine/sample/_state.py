"""Per-sequence sampling state."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """What the sampler needs to know about one running sequence.

    `output_token_ids` is the live list the runtime appends each sampled token
    to; the sampler only reads it. `generator` is set for seeded requests: every
    random number of the sequence comes from it, so a seed gives the same tokens
    whatever else shares the batch.

    Build one with `SamplingState.create`.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # token ids blocked while fewer than params.min_tokens have been generated
    min_tokens_blocked_ids: tuple[int, ...] = ()
    # params.logit_bias as (token ids, biases) tensors on the logits' device
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _prompt_tensor: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        request_seed_offset: int = 0,
        *,
        output_token_ids: list[int] | None = None,
        eos_token_ids: Collection[int] = (),
        device: str | torch.device = "cpu",
    ) -> SamplingState:
        """State for one sequence of a request.

        Args:
            params: the request's sampling parameters.
            prompt_token_ids: the prompt (repetition penalty looks at it).
            request_seed_offset: added to `params.seed`, so that the `n`
                sequences of one seeded request differ (pass the sequence index).
            output_token_ids: the list the runtime appends sampled tokens to
                (default: a new empty list).
            eos_token_ids: blocked, with `params.stop_token_ids`, until
                `params.min_tokens` tokens exist (unless `params.ignore_eos`).
            device: where the generator lives; the logits' device.
        """
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed + request_seed_offset)
        blocked: tuple[int, ...] = ()
        if params.min_tokens > 0:
            ids = set(params.stop_token_ids or ())
            if not params.ignore_eos:
                ids |= set(eos_token_ids)
            blocked = tuple(sorted(ids))
        bias = None
        if params.logit_bias:
            bias = (torch.tensor(list(params.logit_bias), dtype=torch.int64, device=device),
                    torch.tensor(list(params.logit_bias.values()), dtype=torch.float32,
                                 device=device))
        return cls(
            params=params,
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids if output_token_ids is not None else [],
            generator=generator,
            min_tokens_blocked_ids=blocked,
            logit_bias=bias,
        )

    @property
    def blocks_stop_tokens(self) -> bool:
        """True while EOS/stop ids must not be sampled (min_tokens not reached)."""
        return bool(self.min_tokens_blocked_ids) and (
            len(self.output_token_ids) < self.params.min_tokens
        )

    def prompt_tensor(self) -> torch.Tensor:
        """The prompt ids as an int64 CPU tensor, built once."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(list(self.prompt_token_ids), dtype=torch.int64)
        return self._prompt_tensor
