"""`LLMEngine`: the loop that moves requests.

One step reads top to bottom: `Scheduler.schedule` picks the tokens to compute,
the executor's workers run the model and sample, `Scheduler.update_from_output`
records the new tokens, each new token is detokenized and checked against the
request's stop conditions, and finished sequences leave the scheduler.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.core.scheduler import ModelRunnerOutput, Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)

# config.json keys that give a model's context length, most specific first
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def resolve_max_model_len(hf_config: dict[str, Any], requested: int | None) -> int:
    """The context length to serve: ``requested`` when given (it may not exceed the
    model's), else the model's own from ``config.json``."""
    model_len = next((int(hf_config[k]) for k in _CONTEXT_KEYS if hf_config.get(k)), None)
    if requested is None:
        if model_len is None:
            raise ValueError(
                f"config.json names no context length ({', '.join(_CONTEXT_KEYS)}); "
                "pass max_model_len"
            )
        return model_len
    if requested < 1:
        raise ValueError(f"max_model_len must be >= 1, got {requested}")
    if model_len is not None and requested > model_len:
        raise ValueError(
            f"max_model_len={requested} is longer than the model's context ({model_len})"
        )
    return requested


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    seqs: list[Sequence]
    detokenizers: list[Any]
    logprobs: list[list[dict[int, float]] | None]
    arrival_time: float = 0.0

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    """Builds the workers from an `EngineConfig` and runs requests through them."""

    def __init__(self, config: EngineConfig) -> None:
        import registry
        from engine.executor import ExecutorBase
        from engine.platforms import current_platform
        from engine.tokenizer import load_tokenizer

        registry.load_general_plugins()
        self.config = config
        model_config = config.model_config
        model_config.max_model_len = resolve_max_model_len(
            model_config.hf_config, model_config.max_model_len
        )
        current_platform.check_and_update_config(config)
        self.tokenizer = load_tokenizer(model_config.model)
        self.executor = ExecutorBase.get_class(config)(config)
        try:
            self._init_workers()
        except BaseException:
            self.executor.shutdown()
            raise
        self.scheduler: Scheduler | None = None
        if "generate" in self.supported_tasks:
            self.scheduler = Scheduler(
                config.scheduler_config,
                config.cache_config,
                self.num_blocks,
                model_config.max_model_len,
            )
            self.scheduler.eos_token_ids = sorted(self.tokenizer.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._request_ids = itertools.count()
        self.stat_loggers: Any = None  # engine.metrics.StatLoggerManager when log_stats
        if config.log_stats:
            self._init_stats()

    def _init_stats(self) -> None:
        from engine.metrics import RequestStatsTracker, build_stat_loggers

        # a stat-logger plugin that is not a StatLoggerBase raises TypeError here, at start
        self.stat_loggers = build_stat_loggers(self.config)
        self._request_stats = RequestStatsTracker()
        self.stat_loggers.log_engine_initialized()

    def _init_workers(self) -> None:
        config = self.config
        ex = self.executor
        ex.collective_rpc("init_device")
        ex.collective_rpc("load_model")
        self.supported_tasks: tuple[str, ...] = tuple(ex.collective_rpc("get_supported_tasks")[0])
        spec = ex.collective_rpc("get_kv_cache_spec")[0]
        self.num_blocks = 0
        if spec is not None:
            available = min(ex.collective_rpc("determine_available_memory"))
            self.num_blocks = self._num_blocks(spec, available)
            ex.collective_rpc("initialize_cache", (self.num_blocks,))
            logger.info(
                "KV cache: %d blocks of %d tokens (%.1f MiB)",
                self.num_blocks, spec.block_size,
                self.num_blocks * spec.page_size_bytes / 2**20,
            )
        ex.collective_rpc("compile_or_warm_up_model")
        config.cache_config.num_blocks = self.num_blocks

    def _num_blocks(self, spec: Any, available: int) -> int:
        num_blocks = available // spec.page_size_bytes
        if num_blocks < 1:
            raise ValueError(
                f"KV cache memory ({available} bytes) is smaller than one block "
                f"({spec.page_size_bytes} bytes: {spec.block_size} tokens x {spec.num_layers} "
                "layers); raise kv_cache_memory"
            )
        # more than every running sequence at full length is never used
        per_seq = -(-self.config.model_config.max_model_len // spec.block_size)
        return min(num_blocks, per_seq * self.config.scheduler_config.max_num_seqs)

    # ------------------------------------------------------------------ requests

    def _require_generate(self) -> Scheduler:
        if self.scheduler is None:
            raise ValueError(
                f"the model {self.config.model_config.model!r} does not generate text "
                f"(it serves: {', '.join(self.supported_tasks)})"
            )
        return self.scheduler

    def add_request(
        self,
        prompt: str | list[int],
        params: Any = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids) for generation and return its id.

        Raises ValueError for this request alone (nothing is queued) when the
        prompt is empty, longer than the model's context, or could never fit in
        the KV cache; requests already queued are unaffected.
        """
        scheduler = self._require_generate()
        from engine.detokenizer import IncrementalDetokenizer
        from engine.sampling_params import SamplingParams

        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        max_model_len = self.config.model_config.max_model_len
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(token_ids) > max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than the model's context "
                f"length max_model_len={max_model_len}"
            )
        room = max(1, max_model_len - len(token_ids))
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        scheduler.check_fits(len(token_ids), max_tokens)
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs: list[Sequence] = []
        for i in range(params.n):
            seqs.append(
                Sequence(request_id, token_ids, max_tokens, params, index=i,
                         parent=seqs[0] if seqs else None)
            )
        req = _Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            seqs=seqs,
            detokenizers=[
                IncrementalDetokenizer(self.tokenizer, token_ids, params,
                                       max_model_len=max_model_len)
                for _ in seqs
            ],
            logprobs=[[] if params.logprobs is not None else None for _ in seqs],
            arrival_time=time.monotonic(),
        )
        for seq in seqs:
            scheduler.add_sequence(seq)
        self.requests[request_id] = req
        if self.stat_loggers is not None:
            self._request_stats.on_request_added(request_id, req.arrival_time, len(token_ids))
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its sequences free their blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
        if self.stat_loggers is not None:
            self._request_stats.on_finished(request_id, "abort", time.monotonic())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[RequestOutput]:
        """Run one step; returns a snapshot of every request that got new tokens
        (``finished`` set on the last one)."""
        scheduler = self._require_generate()
        scheduler_output = scheduler.schedule()
        if scheduler_output.is_empty:
            if scheduler_output.finished_seq_ids:  # let the workers drop their state
                self.executor.execute_model(scheduler_output)
            if scheduler.has_unfinished() and not scheduler_output.num_preempted:
                raise RuntimeError(
                    "the scheduler could not schedule any of "
                    f"{scheduler.num_unfinished} unfinished sequences"
                )
            return []
        runner_output: ModelRunnerOutput = self.executor.execute_model(scheduler_output)
        touched: dict[str, _Request] = {}
        new_tokens: dict[str, int] = {}  # per request, only counted when stats are on
        for seq, token_id, logprobs in scheduler.update_from_output(
            scheduler_output, runner_output
        ):
            req = self.requests[seq.request_id]
            self._process_token(req, seq, token_id, logprobs)
            touched[req.request_id] = req
            if self.stat_loggers is not None:
                new_tokens[req.request_id] = new_tokens.get(req.request_id, 0) + 1
        if self.stat_loggers is not None:
            self._record_stats(scheduler, new_tokens, touched)
        outputs = []
        for req in touched.values():
            outputs.append(self._make_output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _record_stats(
        self, scheduler: Scheduler, new_tokens: dict[str, int], touched: dict[str, _Request]
    ) -> None:
        now = time.monotonic()
        tracker = self._request_stats
        for request_id, count in new_tokens.items():
            tracker.on_tokens(request_id, count, now)
        for req in touched.values():
            if req.finished:
                tracker.on_finished(req.request_id, req.seqs[0].status.finish_reason, now)
        self.stat_loggers.record(scheduler.make_stats(), tracker.take_iteration_stats(now))

    def _process_token(
        self, req: _Request, seq: Sequence, token_id: int, logprobs: dict[int, float] | None
    ) -> None:
        if req.logprobs[seq.index] is not None and logprobs is not None:
            req.logprobs[seq.index].append(logprobs)
        decision = req.detokenizers[seq.index].add(token_id)
        status = None
        if decision is not None:
            status = (SequenceStatus.FINISHED_LENGTH if decision.finish_reason == "length"
                      else SequenceStatus.FINISHED_STOPPED)
            seq.stop_reason = decision.stop_reason
        elif seq.num_output_tokens >= seq.max_tokens:
            status = SequenceStatus.FINISHED_LENGTH  # the context is full
        if status is not None:
            self.scheduler.finish_sequence(seq, status)

    def _make_output(self, req: _Request) -> RequestOutput:
        completions = []
        for i, seq in enumerate(req.seqs):
            detok = req.detokenizers[i]
            completions.append(
                CompletionOutput(
                    index=i,
                    text=detok.output_text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.status.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(req.logprobs[i]) if req.logprobs[i] is not None else None,
                    text_delta=detok.take_delta(),
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=req.finished,
            num_cached_tokens=max(req.seqs[0].num_cached_tokens, 0),
        )

    # ------------------------------------------------------------------ embeddings

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Pooled embeddings of token-id lists (embedding models only)."""
        if "embed" not in self.supported_tasks:
            raise ValueError(
                f"the model {self.config.model_config.model!r} is not an embedding model "
                f"(it serves: {', '.join(self.supported_tasks)})"
            )
        return self.executor.collective_rpc("embed", (token_id_lists,))[0]

    # ------------------------------------------------------------------ stats, end

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions if self.scheduler is not None else 0

    def shutdown(self) -> None:
        """Stop the workers and flush the stat loggers (idempotent)."""
        stat_loggers, self.stat_loggers = self.stat_loggers, None
        if stat_loggers is not None:
            stat_loggers.shutdown()
        self.executor.shutdown()
