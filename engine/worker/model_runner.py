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
import math
import time
from typing import Any

import torch

from engine.config import EngineConfig
from engine.quantization import step_rows
from engine.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device, is_driver: bool = True) -> None:
        self.config = config
        self.device = device
        # only the driver rank's tokens are used: the others skip sampling
        self.is_driver = is_driver
        self.block_size = config.cache_config.block_size
        self.model: torch.nn.Module | None = None
        self.sampler: Any = None
        self.states: dict[int, Any] = {}  # seq_id -> SamplingState
        self.has_logits_processors = False
        # speculative decoding (driver only): the proposer, and its latest guesses
        self.proposer: Any = None
        self._draft_token_ids: Any = None  # engine.spec_decode.DraftTokenIds
        self._drafts_allowed = False  # no logits processor plugins that drafts would skip
        self._draftable: dict[int, bool] = {}  # seq_id -> _may_draft, once per sequence
        self.lora: Any = None  # engine.lora.LoRAModelManager when LoRA is enabled

    def load_model(self) -> None:
        from engine.model_loader import load_model

        self.model = load_model(self.config)
        self.pack_weights()
        if self.config.compilation_config.backend is not None:
            from engine.compilation import compile_model

            compile_model(self.model, self.config.compilation_config)
        if self.is_generative:
            from engine.sample import Sampler, build_logits_processors

            # only the driver samples, so only it runs the logits processors
            processors = build_logits_processors(self.config, self.device) if self.is_driver else []
            self.sampler = Sampler(processors)
            self.has_logits_processors = bool(processors)
            if self.config.speculative_config is not None and self.is_driver:
                self._load_proposer([name for name, _ in processors])
        if getattr(self.config, "lora_config", None) is not None and self.is_generative:
            from engine.lora.manager import LoRAModelManager

            self.lora = LoRAModelManager(self.model, self.config.lora_config, self.device,
                                         self.dtype)

    def lora_manager(self) -> Any:
        """The LoRA manager; ValueError when LoRA is not enabled."""
        if self.lora is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True")
        return self.lora

    def pack_weights(self) -> None:
        """Prepack the linear weights for the platform's kernels (after loading,
        and after a sleep-mode wake-up, which drops the packed copies)."""
        from engine.platforms import current_platform

        if current_platform.is_cpu():
            from engine.ops.linear import pack_linear_weights

            pack_linear_weights(self.model)

    # ------------------------------------------------------------------ speculative decoding

    def _load_proposer(self, processor_names: list[str]) -> None:
        from engine.spec_decode.selection import proposer_class

        spec = self.config.speculative_config
        self.proposer = proposer_class(spec)(spec, self.config, self.device)
        self.proposer.load(self.model)
        # verified rows skip the logits processors: only the built-in structured-
        # outputs one is known to leave requests without structured outputs alone
        self._drafts_allowed = all(n == "structured_outputs" for n in processor_names)
        if not self._drafts_allowed:
            logger.warning("speculative decoding is off: logits processor plugins are enabled "
                           "(%s), and drafted tokens would skip them", ", ".join(processor_names))

    def initialize_proposer_cache(self, num_blocks: int) -> None:
        """Tell the proposer the size of the target's KV cache (see `Proposer`)."""
        if self.proposer is not None:
            self.proposer.initialize_cache(num_blocks)

    def take_draft_token_ids(self) -> Any:
        """The proposals of the last step (`engine.spec_decode.DraftTokenIds`), once."""
        drafts, self._draft_token_ids = self._draft_token_ids, None
        return drafts

    def _propose(self, seq_ids: list[int], states: list[Any]) -> None:
        from engine.spec_decode import DraftTokenIds, TokenView

        ids, tokens = [], []
        for seq_id, state in zip(seq_ids, states, strict=True):
            if state.params.min_tokens <= len(state.output_token_ids) and self._draftable.get(
                    seq_id, False):
                ids.append(seq_id)
                tokens.append(TokenView(state.prompt_token_ids, state.output_token_ids))
        drafts = self.proposer.propose(ids, tokens) if ids else []
        self._draft_token_ids = DraftTokenIds(ids, [list(d) for d in drafts])

    def _may_draft(self, params: Any) -> bool:
        """Whether a sequence's next tokens may be verified in one step (once it has
        min_tokens tokens): its sampling must not depend on what the drafts change
        (penalties look at the output, structured outputs and logits processors at
        the text so far; a logit bias is left to the plain sampler), and a kept
        draft has no log-probabilities to report."""
        return (self._drafts_allowed and params.logprobs is None and not params.has_penalties
                and params.structured_outputs is None and params.logit_bias is None)

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
        if self.lora is not None:  # every rank: which rows run which adapter
            self.lora.begin_step(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        with torch.inference_mode():
            input_ids, positions, attn_metadata, logits_rows, seq_ids, drafts = (
                self._prepare_inputs(scheduler_output))
            # a step of decode rows only: quantized layers may then treat every row
            # as a lone sequence's decode row (engine.quantization.step_rows)
            with step_rows(attn_metadata.max_query_len == 1):
                hidden = self.model(input_ids, positions, attn_metadata)
                if not seq_ids:  # only prompt chunks this step: nothing to sample
                    return ModelRunnerOutput()
                # in the model's dtype: the sampler copies them to float32 when it
                # needs more than an argmax (which is exact in any dtype)
                logits = self.model.compute_logits(hidden.index_select(0, logits_rows))
            if not self.is_driver:
                return ModelRunnerOutput()
            states = [self.states[i] for i in seq_ids]
            accepted = None
            if any(drafts):
                from engine.spec_decode.verify import sample_with_drafts

                sampled = sample_with_drafts(self.sampler, logits, states, drafts)
                accepted = sampled.accepted
                for state, kept in zip(states, accepted, strict=True):
                    state.output_token_ids.extend(kept)
            else:
                sampled = self.sampler(logits, states)
            nonfinite = _nonfinite_rows(logits, sampled.token_ids) if not any(drafts) else []
        token_ids = list(sampled.token_ids)
        for state, token_id in zip(states, token_ids, strict=True):
            state.output_token_ids.append(token_id)
        if self.proposer is not None:
            self._propose(seq_ids, states)
        return ModelRunnerOutput(seq_ids, token_ids, sampled.logprobs,
                                 accepted_token_ids=accepted,
                                 nonfinite_seq_ids=[seq_ids[i] for i in nonfinite] or None)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        from engine.sample import SamplingState

        if not self.is_driver:
            return
        for seq_id in scheduler_output.finished_seq_ids:
            self.states.pop(seq_id, None)
        if self.proposer is not None and scheduler_output.finished_seq_ids:
            self.proposer.remove(scheduler_output.finished_seq_ids)
            for seq_id in scheduler_output.finished_seq_ids:
                self._draftable.pop(seq_id, None)
        for new in scheduler_output.new_seqs:
            self.states[new.seq_id] = SamplingState.create(
                new.sampling_params,
                new.prompt_token_ids,
                new.seed_offset,
                eos_token_ids=new.eos_token_ids,
                device=self.device,
            )
            if self.proposer is not None:
                self._draftable[new.seq_id] = self._may_draft(new.sampling_params)

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
        drafts: list[list[int]] = []  # per sampled sequence: the drafts to verify
        for item in scheduler_output.scheduled:
            start, n = item.num_computed_tokens, len(item.token_ids)
            table = item.block_table
            input_ids.extend(item.token_ids)
            positions.extend(range(start, start + n))
            # one range per cache block, not a Python step per prompt token
            p, end = start, start + n
            while p < end:
                take = min(bs - p % bs, end - p)
                base = table[p // bs] * bs + p % bs
                slot_mapping.extend(range(base, base + take))
                p += take
            if item.num_draft_tokens:
                # a verified position j is attended as its own decoding sequence of
                # start + j + 1 tokens: the path (and the numerics) of plain decoding
                query_lens.extend([1] * n)
                seq_lens.extend(range(start + 1, start + n + 1))
                block_tables.extend([table] * n)
            else:
                query_lens.append(n)
                seq_lens.append(start + n)
                block_tables.append(table)
            if item.sample:
                # a drafted sequence needs the logits after each draft, and before the first
                k = item.num_draft_tokens
                logits_rows.extend(range(len(input_ids) - 1 - k, len(input_ids)))
                seq_ids.append(item.seq_id)
                drafts.append(item.token_ids[n - k:] if k else [])
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
            drafts,
        )

    # ------------------------------------------------------------------ warm-up

    def warm_up(self, num_blocks: int, shapes: bool = True) -> None:
        """Run the steps of `engine.worker.warm_up` (generative models, on a KV
        cache of `num_blocks` blocks) and, with `shapes`, its shape stages (every
        prompt-step row bucket of the linear layers, every prompt length of the
        attention layers), or one small embedding batch; leave no sequence state
        behind."""
        if not self.is_generative:
            self.embed([[3] * 8, [4] * 24])
            return
        if num_blocks < 1:
            return
        from engine.sample import Sampler
        from engine.worker.warm_up import (
            warm_up_attention,
            warm_up_linear_buckets,
            warm_up_steps,
        )

        vocab = int(self.config.model_config.hf_config.get("vocab_size") or 2)
        sampler = self.sampler
        if self.has_logits_processors:
            # processors are told of every request; the warm-up's are none of theirs
            self.sampler = Sampler()
        devices = [] if self.device.type == "cpu" else [self.device]
        start = time.perf_counter()
        # the unseeded sampling row draws from the global generator: give it back
        # as it was, so requests sample as they would without the warm-up
        with torch.random.fork_rng(devices, device_type=self.device.type):
            try:
                steps = 0
                for step in warm_up_steps(self.config, num_blocks, vocab):
                    self.execute_model(step)
                    steps += 1
            finally:
                self.sampler = sampler
                self.states = {i: s for i, s in self.states.items() if i >= 0}
                self._draft_token_ids = None  # proposals for the warm-up's sequences
        steps_done = time.perf_counter()
        if not shapes:
            logger.info("warm-up: %d steps in %.2f s (shape stages off: ENGINE_WARM_UP=steps)",
                        steps, steps_done - start)
            return
        # a step computes at most the step budget, and never more tokens than the
        # cache has slots for (each one writes its K and V)
        budget = min(self.config.scheduler_config.max_num_batched_tokens,
                     num_blocks * self.config.cache_config.block_size)
        buckets = warm_up_linear_buckets(self.model, budget)
        buckets_done = time.perf_counter()
        lengths = warm_up_attention(
            self.model, min(budget, self.config.model_config.max_model_len), self.dtype,
            self.config.cache_config.block_size, num_blocks, device=self.device)
        end = time.perf_counter()
        logger.info("warm-up: %d steps (%.2f s), %d linear row buckets (%.2f s), %d prompt "
                    "lengths (%.2f s) in %.2f s", steps, steps_done - start, buckets,
                    buckets_done - steps_done, lengths, end - buckets_done, end - start)

    # ------------------------------------------------------------------ embeddings

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        from engine.pooling import embed

        with torch.inference_mode():
            return embed(self.model, token_id_lists).float().cpu().tolist()


def _nonfinite_rows(logits: torch.Tensor, token_ids: list[int]) -> list[int]:
    """The rows whose logit at the sampled token is NaN or infinite. A NaN
    anywhere in a row's hidden state (NaN weights, a float16 overflow) makes every
    logit of the row NaN, and every sampling path then picks a meaningless token:
    one logit per row (not the whole vocabulary) finds it, for ~10-30 us a step."""
    if len(token_ids) <= 4:  # a few scalar reads cost less than three tensor ops
        return [i for i, t in enumerate(token_ids) if not math.isfinite(logits[i, t].item())]
    index = torch.tensor(token_ids, dtype=torch.int64, device=logits.device).view(-1, 1)
    chosen = logits.gather(1, index).view(-1).float()
    if math.isfinite(float(chosen.sum())):  # finite logits never sum to infinity
        return []
    return (~torch.isfinite(chosen)).nonzero().view(-1).tolist()
