"""`ModelRunner`: a scheduled step in, sampled tokens out.

It turns a `SchedulerOutput` into flat ``input_ids`` / ``positions`` tensors and
the `AttentionMetadata` of the step, runs the model, computes logits only for
the sequences whose step reaches their last token (a finished prefill or a
decode), and samples them. It keeps one `SamplingState` per live sequence
(generator, output tokens for penalties) from the step that first schedules it
to the step after it finishes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: Any, device: torch.device, is_driver: bool = True) -> None:
        self.config = config
        self.device = device
        # only the driver rank's tokens are used: the others skip sampling
        self.is_driver = is_driver
        self.block_size = config.cache_config.block_size
        self.model: torch.nn.Module | None = None
        self.sampler: Any = None
        self.states: dict[int, Any] = {}  # seq_id -> SamplingState

    def load_model(self) -> None:
        from engine.model_loader import load_model

        self.model = load_model(self.config)
        from engine.platforms import current_platform

        if current_platform.is_cpu():
            from engine.ops.linear import pack_linear_weights

            pack_linear_weights(self.model)
        if self.is_generative:
            from engine.sample import Sampler, build_logits_processors

            # only the driver samples, so only it runs the logits processors
            processors = build_logits_processors(self.config, self.device) if self.is_driver else []
            self.sampler = Sampler(processors)

    @property
    def is_generative(self) -> bool:
        return hasattr(self.model, "compute_logits")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.get_default_dtype()

    # ------------------------------------------------------------------ a step

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        with torch.inference_mode():
            input_ids, positions, attn_metadata, logits_rows, seq_ids = self._prepare_inputs(
                scheduler_output
            )
            hidden = self.model(input_ids, positions, attn_metadata)
            if not seq_ids:  # only prompt chunks this step: nothing to sample
                return ModelRunnerOutput()
            # in the model's dtype: the sampler copies them to float32 when it needs
            # more than an argmax (which is exact in any dtype)
            logits = self.model.compute_logits(hidden.index_select(0, logits_rows))
            if not self.is_driver:
                return ModelRunnerOutput()
            states = [self.states[i] for i in seq_ids]
            sampled = self.sampler(logits, states)
        token_ids = list(sampled.token_ids)
        for state, token_id in zip(states, token_ids, strict=True):
            state.output_token_ids.append(token_id)
        return ModelRunnerOutput(seq_ids, token_ids, sampled.logprobs)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        from engine.sample import SamplingState

        if not self.is_driver:
            return
        for seq_id in scheduler_output.finished_seq_ids:
            self.states.pop(seq_id, None)
        for new in scheduler_output.new_seqs:
            self.states[new.seq_id] = SamplingState.create(
                new.sampling_params,
                new.prompt_token_ids,
                new.seed_offset,
                eos_token_ids=new.eos_token_ids,
                device=self.device,
            )

    def _prepare_inputs(self, scheduler_output: SchedulerOutput):
        from engine.attention import AttentionMetadata

        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        logits_rows: list[int] = []
        seq_ids: list[int] = []
        for item in scheduler_output.scheduled:
            start, n = item.num_computed_tokens, len(item.token_ids)
            table = item.block_table
            input_ids.extend(item.token_ids)
            positions.extend(range(start, start + n))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            block_tables.append(table)
            if item.sample:
                logits_rows.append(len(input_ids) - 1)
                seq_ids.append(item.seq_id)
        device = self.device
        attn_metadata = AttentionMetadata.build(
            query_lens, seq_lens, block_tables, slot_mapping, bs, device
        )
        return (
            torch.tensor(input_ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            attn_metadata,
            torch.tensor(logits_rows, dtype=torch.int64, device=device),
            seq_ids,
        )

    # ------------------------------------------------------------------ embeddings

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        from engine.pooling import embed

        with torch.inference_mode():
            return embed(self.model, token_id_lists).float().cpu().tolist()
