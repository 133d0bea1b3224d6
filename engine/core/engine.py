"""`LLMEngine`: the loop that moves requests.

One step reads top to bottom: `Scheduler.schedule` picks the tokens to compute,
the executor's workers run the model and sample, `Scheduler.update_from_output`
records the new tokens, each new token is detokenized and checked against the
request's stop conditions, and finished sequences leave the scheduler.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import time
from collections import abc
from dataclasses import dataclass, field
from typing import Any, NoReturn

from engine.config import EngineConfig
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.outputs import CompletionOutput, RequestOutput
from engine.step import ModelRunnerOutput
from engine.structured_outputs.grammar import checked_matcher
from engine.structured_outputs.processor import ll_tokenizer
from engine.utils import STARTUP_LOGGER, first_line, short_repr

logger = logging.getLogger(__name__)
startup_logger = logging.getLogger(STARTUP_LOGGER)

# With no kv_cache_memory given, the cache holds this many sequences at the full
# context length (more shorter ones share it: blocks are taken as tokens arrive),
# like llama.cpp's server slots; vLLM instead takes a fixed share of the device.
# A small-context model gets at least DEFAULT_MIN_CACHE_BYTES, so it still runs
# many sequences at once. A bigger cache costs memory a small model never uses
# (docs/first-run.md).
DEFAULT_FULL_LENGTH_SEQS = 4
DEFAULT_MIN_CACHE_BYTES = 512 * 2**20

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


def _check_text(text: str) -> None:
    """Raise ValueError when `text` cannot be tokenized (lone surrogates such as
    ``"\\ud800"``, which JSON allows and UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text is not valid Unicode: {exc.reason} at character {exc.start} "
            f"({text[exc.start:exc.end]!r})"
        ) from None


def _too_long(num_tokens: int, limit: int) -> ValueError:
    return ValueError(f"the prompt has {num_tokens} tokens, more than the model's context "
                      f"length max_model_len={limit}")


# the seeds a request's generators accept: torch's 64-bit range
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt already tokenized and checked by `LLMEngine.tokenize_prompt`:
    `add_request` takes it as it is, so each prompt is checked once."""

    text: str | None
    token_ids: list[int]


class RequestFailedError(RuntimeError):
    """An engine step raised: the requests of that step (`request_ids`) were
    failed and freed; the engine keeps serving the others. ``__cause__`` is the
    original exception, whose type and message this one repeats."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        # one line: a native library's panic carries its backtrace in the message,
        # which belongs in the server log (`_fail_step` logs it), not in a response
        super().__init__(f"the engine step failed ({type(cause).__name__}: "
                         f"{first_line(str(cause))}); "
                         f"its {len(request_ids)} request(s) were stopped")
        self.request_ids = request_ids


class EngineSleepingError(RuntimeError):
    """A request arrived while the engine sleeps (`LLMEngine.sleep`): nothing
    was queued; `wake_up` first."""


class EngineShutDownError(RuntimeError):
    """A request arrived after `LLMEngine.shutdown` (or the end of an `LLM`'s
    ``with`` block): nothing was queued; the engine cannot be started again."""


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
    # structured outputs: one llguidance matcher per sequence, advanced by each
    # sampled token (None: unconstrained); errors[i] says why sequence i failed
    matchers: list[Any] | None = None
    errors: list[str | None] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    """Builds the workers from an `EngineConfig` and runs requests through them."""

    _is_shut_down = False  # set by `shutdown`

    def __init__(self, config: EngineConfig) -> None:
        import registry
        from engine.executor import executor_class
        from engine.platforms import current_platform
        from engine.tokenizer import load_tokenizer

        registry.load_general_plugins()
        registry.check_plugin_configs()  # bad plugin settings fail the start, naming the field
        self.config = config
        model_config = config.model_config
        model_config.max_model_len = resolve_max_model_len(
            model_config.hf_config, model_config.max_model_len
        )
        current_platform.check_and_update_config(config)
        self.speculative_config = config.speculative_config
        if self.speculative_config is not None:
            from engine.spec_decode.selection import check_speculative_support

            check_speculative_support(config)
        self.tokenizer = load_tokenizer(model_config.model)
        model_vocab = model_config.hf_config.get("vocab_size")
        if model_vocab and self.tokenizer.vocab_size > int(model_vocab):
            logger.warning(
                "the tokenizer has %d tokens, the model's vocabulary %d (config.json's "
                "vocab_size): a text that tokenizes to a higher id is refused; are the "
                "tokenizer files and the weights from the same model?",
                self.tokenizer.vocab_size, int(model_vocab))
        self.executor = executor_class(config)(config)
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
            if self.speculative_config is not None:
                self.scheduler.num_speculative_tokens = (
                    self.speculative_config.num_speculative_tokens)
        self.loras: Any = None  # engine.lora.engine_side.EngineLoRAs when enable_lora
        if config.lora_config is not None:
            self._init_loras()
        self.requests: dict[str, _Request] = {}
        self._request_ids = itertools.count()
        self.stat_loggers: Any = None  # engine.metrics.StatLoggerManager when log_stats
        if config.log_stats:
            self._init_stats()

    def _init_loras(self) -> None:
        from engine.lora.engine_side import EngineLoRAs

        loras = EngineLoRAs(self.executor, self.config.lora_config)
        try:
            loras.check_workers(self.config.parallel_config.worker_cls)
        except BaseException:
            self.executor.shutdown()
            raise
        self.loras = loras
        if self.scheduler is not None:
            self.scheduler.max_loras = self.config.lora_config.max_loras

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
        self.sleep_level = 0  # sleep mode: 0 awake, else the level slept at
        if config.model_config.enable_sleep_mode:
            self._check_sleep_support()
        ex.collective_rpc("load_model")
        self.supported_tasks: tuple[str, ...] = tuple(ex.collective_rpc("get_supported_tasks")[0])
        spec = ex.collective_rpc("get_kv_cache_spec")[0]
        self.num_blocks = 0
        if spec is not None:
            available = min(ex.collective_rpc("determine_available_memory"))
            self.num_blocks, why = self._num_blocks(spec, available)
            ex.collective_rpc("initialize_cache", (self.num_blocks,))
            startup_logger.info(
                "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)",
                self.num_blocks, spec.block_size, self.num_blocks * spec.block_size,
                self.num_blocks * spec.page_size_bytes / 2**30, why)
        ex.collective_rpc("compile_or_warm_up_model")
        config.cache_config.num_blocks = self.num_blocks

    def _check_sleep_support(self) -> None:
        from engine.worker.worker_base import unimplemented_methods

        for rank, missing in enumerate(self.executor.collective_rpc(
                unimplemented_methods, (("sleep", "wake_up"),))):
            if missing:
                raise NotImplementedError(
                    f"enable_sleep_mode=True needs the worker's sleep() and wake_up(); the "
                    f"worker class {self.config.parallel_config.worker_cls} (rank {rank}) does "
                    f"not implement {', '.join(m + '()' for m in missing)}")

    def _num_blocks(self, spec: Any, available: int) -> tuple[int, str]:
        """How many KV-cache blocks to allocate, and why: `available` bytes (what
        kv_cache_memory says, else the memory fraction) cap it; never more than
        every running sequence at full length uses; with no kv_cache_memory given,
        `DEFAULT_FULL_LENGTH_SEQS` sequences at full length or
        `DEFAULT_MIN_CACHE_BYTES`, whichever is more."""
        cache = self.config.cache_config
        max_model_len = self.config.model_config.max_model_len
        max_num_seqs = self.config.scheduler_config.max_num_seqs
        num_blocks = available // spec.page_size_bytes
        if num_blocks < 1:
            raise ValueError(
                f"KV cache memory ({available} bytes) is smaller than one block "
                f"({spec.page_size_bytes} bytes: {spec.block_size} tokens x {spec.num_layers} "
                "layers); raise kv_cache_memory"
            )
        per_seq = -(-max_model_len // spec.block_size)
        wanted = per_seq * max_num_seqs
        reason = f"room for max_num_seqs={max_num_seqs} sequences of max_model_len={max_model_len}"
        if cache.kv_cache_memory is not None:
            source = f"kv_cache_memory={cache.kv_cache_memory}"
        else:
            source = f"kv_cache_memory_fraction={cache.kv_cache_memory_fraction:g} of memory"
            seqs = min(max_num_seqs, DEFAULT_FULL_LENGTH_SEQS)
            floor = DEFAULT_MIN_CACHE_BYTES // spec.page_size_bytes
            if max(per_seq * seqs, floor) < wanted:
                wanted = max(per_seq * seqs, floor)
                reason = (f"room for {seqs} sequences of max_model_len={max_model_len}"
                          if per_seq * seqs >= floor else
                          f"the {DEFAULT_MIN_CACHE_BYTES // 2**20} MiB default minimum")
        per_token = f"{spec.page_size_bytes // spec.block_size} bytes/token"
        if num_blocks <= wanted:
            return num_blocks, f"{source}, {per_token}; kv_cache_memory=SIZE to change"
        return wanted, f"{reason}, {per_token}; kv_cache_memory=SIZE to change"

    # ------------------------------------------------------------------ requests

    def _require_generate(self) -> Scheduler:
        if self.scheduler is None:
            raise ValueError(
                f"the model {self.config.model_config.model!r} does not generate text "
                f"(it serves: {', '.join(self.supported_tasks)})"
            )
        return self.scheduler

    @functools.cached_property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are ``0 .. vocab_size - 1`` (the model's
        embedding rows; the tokenizer's count when config.json names none)."""
        size = self.config.model_config.hf_config.get("vocab_size")
        return int(size) if size else self.tokenizer.vocab_size

    @functools.cached_property
    def _longest_token_chars(self) -> int:
        return max(1, max((len(t) for t in self.tokenizer.backend.get_vocab()), default=1))

    @property
    def max_prompt_chars(self) -> int:
        """Characters a text prompt may have: no token covers more characters
        than the tokenizer's longest, so a longer text cannot fit in the context
        and is refused without being tokenized (a huge prompt never stalls a
        thread)."""
        return self.config.model_config.max_model_len * self._longest_token_chars

    def tokenize_prompt(self, prompt: str | abc.Sequence[int] | TokenizedPrompt,
                        max_length: int | None = None) -> TokenizedPrompt:
        """Tokenize and check one prompt: not empty, every id in the vocabulary,
        at most `max_length` tokens (default: the context length). Safe to call
        from any thread (servers call it off the step thread).

        Raises ValueError saying what is wrong.
        """
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        limit = self.config.model_config.max_model_len if max_length is None else max_length
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                raise ValueError(
                    f"the prompt has {len(prompt)} characters, more than fit in the model's "
                    f"context length max_model_len={self.config.model_config.max_model_len}"
                )
            _check_text(prompt)
            text, token_ids = prompt, self.tokenizer.encode(prompt)
            self._check_tokenizer_ids(token_ids)
        else:
            if len(prompt) > limit:  # before looking at a million ids one by one
                raise _too_long(len(prompt), limit)
            text, token_ids = None, self._checked_ids(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(token_ids) > limit:
            raise _too_long(len(token_ids), limit)
        return TokenizedPrompt(text, token_ids)

    def _check_tokenizer_ids(self, token_ids: list[int]) -> None:
        """Raise ValueError when the tokenizer made an id the model has no embedding
        row for (a tokenizer.json from another model than the weights): without
        this the step would fail on the embedding lookup."""
        vocab = self.vocab_size
        if token_ids and max(token_ids) >= vocab:
            i = next(i for i, t in enumerate(token_ids) if t >= vocab)
            raise ValueError(
                f"the tokenizer made token id {token_ids[i]} (position {i}), outside the "
                f"model's vocabulary (0..{vocab - 1}, config.json's vocab_size): the "
                f"tokenizer has {self.tokenizer.vocab_size} tokens; are its tokenizer files "
                "and its weights from the same model?"
            )

    def _checked_ids(self, prompt: abc.Sequence[int]) -> list[int]:
        vocab = self.vocab_size
        token_ids = []
        for i, t in enumerate(prompt):
            try:
                token_id = operator.index(t) if not isinstance(t, bool) else -1
            except TypeError:
                token_id = -1
            if not 0 <= token_id < vocab:
                raise ValueError(
                    f"token id {short_repr(t, 40)} at position {i} is not in the model's "
                    f"vocabulary (0..{vocab - 1})"
                )
            token_ids.append(token_id)
        return token_ids

    def add_request(
        self,
        prompt: str | abc.Sequence[int] | TokenizedPrompt,
        params: Any = None,
        request_id: str | None = None,
        lora_request: Any = None,
    ) -> str:
        """Queue a prompt (text, token ids, or a `TokenizedPrompt`) for generation
        and return its id. `lora_request` (an `engine.LoRARequest`) runs it with
        that adapter, loading it first (ValueError naming the adapter and field
        when it cannot be served).

        Raises ValueError for this request alone (nothing is queued) when the
        prompt is empty, holds ids outside the vocabulary, is longer than the
        model's context or could never fit in the KV cache, or the seed is out
        of range; requests already queued are unaffected.
        """
        scheduler = self._require_generate()
        self._check_awake()
        from engine.sampling_params import SamplingParams
        from engine.tokenizer import IncrementalDetokenizer

        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.seed is not None and not _SEED_MIN <= params.seed <= _SEED_MAX - (params.n - 1):
            raise ValueError(
                f"SamplingParams.seed must be in [-2**63, 2**64 - n] (n={params.n}), "
                f"got {params.seed}"
            )
        self.check_limits(params)
        tokenized = self.tokenize_prompt(prompt)
        text, token_ids = tokenized.text, tokenized.token_ids
        from engine.platforms import current_platform
        from engine.sample.logits_processor import validate_params_for_processors

        current_platform.validate_request(token_ids, params)  # ValueError: refused, not queued
        validate_params_for_processors(self._logits_processor_classes, params)
        matcher = self.check_structured_outputs(params)
        max_model_len = self.config.model_config.max_model_len
        room = max(1, max_model_len - len(token_ids))
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        scheduler.check_fits(len(token_ids), max_tokens)
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_request is not None:
            lora_request = self._lora_engine().ensure(lora_request)
        seqs: list[Sequence] = []
        for i in range(params.n):
            seqs.append(
                Sequence(request_id, token_ids, max_tokens, params, index=i,
                         parent=seqs[0] if seqs else None, lora_request=lora_request)
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
            matchers=None if matcher is None else [matcher.deep_copy() for _ in seqs],
            errors=[None] * len(seqs),
        )
        for seq in seqs:
            scheduler.add_sequence(seq)
        self.requests[request_id] = req
        if self.stat_loggers is not None:
            self._request_stats.on_request_added(request_id, req.arrival_time, len(token_ids))
        return request_id

    def check_limits(self, params: Any) -> None:
        """Check what one request asks for against the engine's limits: ``n`` <=
        ``max_n``, ``logprobs`` <= ``max_logprobs``, ``stop_token_ids`` in the
        vocabulary. Safe from any thread. Raises ValueError naming the field."""
        limits = self.config.scheduler_config
        for name, value, limit, setting in (
                ("n", params.n, limits.max_n, "max_n"),
                ("logprobs", params.logprobs, limits.max_logprobs, "max_logprobs")):
            if value is not None and value > limit:
                raise ValueError(f"SamplingParams.{name} must be <= {limit} (the engine's "
                                 f"{setting}), got {value}")
        vocab = self.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", params.logit_bias or ())):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"SamplingParams.{name} must name token ids of the "
                                 f"vocabulary (0..{vocab - 1}), got {short_repr(bad[0], 40)}")

    def check_structured_outputs(self, params: Any) -> Any:
        """Check that the engine can enforce ``params.structured_outputs`` (its
        grammar compiles and a matcher over this model's tokenizer survives its
        first tokens; cached per grammar). Returns that matcher, or None for an
        unconstrained request. Safe from any thread: the server calls it off the
        event loop before `add_request`, which calls it again (a cache hit).

        Raises ValueError naming the field (``StructuredOutputsParams.choice
        cannot be enforced: ...``).
        """
        structured = getattr(params, "structured_outputs", None)
        if structured is None:
            return None
        hf_config = self.config.model_config.hf_config
        vocab = hf_config.get("vocab_size") or (hf_config.get("text_config") or {}).get(
            "vocab_size")  # as the worker's processor reads it: the same matcher
        tokenizer = ll_tokenizer(self.config.model_config.model, int(vocab or 0))
        return checked_matcher(structured, tokenizer)

    @functools.cached_property
    def _logits_processor_classes(self) -> list[tuple[str, type]]:
        """The processors' classes, whose `validate_params` checks each request."""
        from engine.sample import logits_processor_classes

        return logits_processor_classes(self.config)

    # ------------------------------------------------------------------ LoRA

    def _lora_engine(self) -> Any:
        if self.loras is None:
            raise ValueError("a LoRA adapter was requested but LoRA is not enabled: start "
                             "the engine with enable_lora=True (--enable-lora)")
        return self.loras

    def add_lora(self, lora_request: Any) -> bool:
        """Load an adapter on every rank now (requests naming it load it
        themselves otherwise); False when it already was. Raises ValueError
        naming the adapter and field for one that cannot be served."""
        loras = self._lora_engine()
        known = lora_request.int_id in loras.by_id
        loras.ensure(lora_request)
        return not known

    def remove_lora(self, lora_id: int) -> bool:
        """Unload an adapter from every rank; False when it was not loaded."""
        removed = self._lora_engine().remove(lora_id)
        if self.scheduler is not None:
            self.scheduler.pinned_loras.discard(lora_id)
        return removed

    def list_loras(self) -> list[Any]:
        """The `LoRARequest` of every adapter loaded."""
        return list(self._lora_engine().by_id.values())

    def pin_lora(self, lora_id: int) -> bool:
        """Keep a loaded adapter resident until it is removed."""
        pinned = self._lora_engine().pin(lora_id)
        if self.scheduler is not None:
            self.scheduler.pinned_loras.add(lora_id)
        return pinned

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its sequences free their blocks (an unknown or
        finished id is ignored)."""
        if self._finish_request(request_id, SequenceStatus.FINISHED_ABORTED) and (
                self.stat_loggers is not None):
            # the gauges must not keep counting a request that is gone
            self._record_stats(self.scheduler, {}, {})

    def _finish_request(self, request_id: str, status: SequenceStatus) -> bool:
        """End a request's sequences (their blocks are freed); False when unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            self.scheduler.finish_sequence(seq, status)
        if self.stat_loggers is not None:
            self._request_stats.on_finished(request_id, "abort", time.monotonic())
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_unfinished_requests(self) -> int:
        """Requests added and not yet finished or aborted."""
        return len(self.requests)

    def kv_cache_usage(self) -> float:
        """Fraction of KV-cache blocks held by requests now (0.0 when none run,
        and for models without a KV cache)."""
        return self.scheduler.kv_cache.usage if self.scheduler is not None else 0.0

    def quantized_layers(self) -> dict[str, list[str]]:
        """Layer name -> the quantization methods its weight is stored with, in
        rank 0's model (empty when every weight is float; docs/quantization.md)."""
        return self.executor.collective_rpc(_quantized_layers_of_worker)[0]

    def check_health(self) -> None:
        """Raise when a worker (or its device) is gone: the executor's error,
        naming the rank. Cheap enough to call while idle."""
        self.executor.check_health()

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[RequestOutput]:
        """Run one step; returns a snapshot of every request that got new tokens
        (``finished`` set on the last one).

        When the step raises and the workers are still healthy, the requests
        scheduled in it are stopped and freed and `RequestFailedError` (naming
        the cause) is raised; the engine keeps serving the others. A dead
        worker or device raises the executor's own error: the engine is done.
        """
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
            if self.stat_loggers is not None and scheduler_output.finished_seq_ids:
                self._record_stats(scheduler, {}, {})  # went idle: gauges to zero
            return []
        try:
            return self._run_step(scheduler, scheduler_output)
        except Exception as exc:
            self._fail_step(scheduler_output, exc)

    def _run_step(self, scheduler: Scheduler, scheduler_output: Any) -> list[RequestOutput]:
        runner_output: ModelRunnerOutput = self.executor.execute_model(scheduler_output)
        if self.speculative_config is not None:  # the proposals for the next step
            scheduler.update_draft_token_ids(
                self.executor.collective_rpc("take_draft_token_ids")[0])
        touched: dict[str, _Request] = {}
        new_tokens: dict[str, int] = {}  # per request, only counted when stats are on
        results = scheduler.update_from_output(scheduler_output, runner_output)
        # a speculative step gives a sequence several tokens: each is checked against
        # the stop conditions as if it came alone, and those after a stop are dropped
        pending: dict[int, int] = {}
        for seq, _, _ in results:
            pending[seq.seq_id] = pending.get(seq.seq_id, 0) + 1
        nonfinite = set(runner_output.nonfinite_seq_ids or ())
        for seq, token_id, logprobs in results:
            pending[seq.seq_id] -= 1
            if seq.is_finished:
                continue
            req = self.requests[seq.request_id]
            if seq.seq_id in nonfinite:
                self._fail_nonfinite(req, seq, pending[seq.seq_id] + 1)
                touched[req.request_id] = req
                continue
            self._process_token(req, seq, token_id, logprobs, pending[seq.seq_id])
            if seq.is_finished:
                seq.drop_last_tokens(pending[seq.seq_id])
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

    def _fail_step(self, scheduler_output: Any, exc: Exception) -> NoReturn:
        """Stop the requests of a failed step and raise `RequestFailedError`, or
        re-raise when the workers themselves are gone (nothing can be served)."""
        try:
            self.executor.check_health()
        except Exception as health_error:
            raise exc from health_error
        scheduled = {item.seq_id for item in scheduler_output.scheduled}
        failed = [request_id for request_id, req in self.requests.items()
                  if any(seq.seq_id in scheduled for seq in req.seqs)]
        logger.error("an engine step failed; stopping its %d request(s): %s: %s",
                     len(failed), type(exc).__name__, exc)
        for request_id in failed:
            self._finish_request(request_id, SequenceStatus.FINISHED_ABORTED)
        if self.stat_loggers is not None:
            self._record_stats(self.scheduler, {}, {})
        raise RequestFailedError(failed, exc) from exc

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
        self, req: _Request, seq: Sequence, token_id: int, logprobs: dict[int, float] | None,
        num_later: int = 0,
    ) -> None:
        """Record one new token (``num_later`` more of the same step follow it in
        ``seq``) and finish ``seq`` when it stops there."""
        if req.logprobs[seq.index] is not None and logprobs is not None:
            req.logprobs[seq.index].append(logprobs)
        decision = req.detokenizers[seq.index].add(token_id)
        status = None
        if req.matchers is not None and not req.matchers[seq.index].consume_token(token_id):
            # the constraint failed midway (an llguidance limit): the worker forced
            # end-of-sequence, which must not read as a "stop" that matches
            req.errors[seq.index] = ("structured outputs: the constraint could not be "
                                     "enforced: " + first_line(req.matchers[seq.index].get_error()))
            logger.warning("request %s: %s", req.request_id, req.errors[seq.index])
            status = SequenceStatus.FINISHED_ERROR
        elif decision is not None:
            status = (SequenceStatus.FINISHED_LENGTH if decision.finish_reason == "length"
                      else SequenceStatus.FINISHED_STOPPED)
            seq.stop_reason = decision.stop_reason
        elif seq.num_output_tokens - num_later >= seq.max_tokens:
            status = SequenceStatus.FINISHED_LENGTH  # the context is full
        if status is not None:
            self.scheduler.finish_sequence(seq, status)

    def _fail_nonfinite(self, req: _Request, seq: Sequence, num_tokens: int) -> None:
        """End `seq` with an error: its logits were NaN or infinite, so the token
        sampled from them (dropped, with the step's others) means nothing. The
        request's other sequences and the engine's other requests go on."""
        dtype = self.config.model_config.dtype
        req.errors[seq.index] = (
            "the model's logits are not finite (NaN or infinity): the checkpoint holds "
            "NaN or infinite weights, or an activation overflowed in the model's dtype "
            f"(dtype={dtype!r}; float16 overflows first: try 'bfloat16' or 'float32')")
        logger.warning("request %s: %s", req.request_id, req.errors[seq.index])
        self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_ERROR)
        seq.drop_last_tokens(num_tokens)

    def request_snapshot(self, request_id: str) -> RequestOutput:
        """An unfinished request's `RequestOutput` as it stands, between the steps
        that return one (its ``text_delta``: text not yet returned by a step or a
        snapshot). Raises KeyError for an id that is not unfinished here."""
        return self._make_output(self.requests[request_id])

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
                    error=req.errors[i] if req.errors else None,
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
        """Pooled embeddings of token-id lists (embedding models only); the
        lists are checked as `embedding_token_ids` checks them."""
        if "embed" not in self.supported_tasks:
            raise ValueError(
                f"the model {self.config.model_config.model!r} is not an embedding model "
                f"(it serves: {', '.join(self.supported_tasks)})"
            )
        self._check_awake()
        token_id_lists = [self._checked_ids(ids) for ids in token_id_lists]
        return self.executor.collective_rpc("embed", (token_id_lists,))[0]

    @functools.cached_property
    def embed_max_length(self) -> int:
        """Tokens an embedding model reads: the context length, or the shorter
        ``max_seq_length`` of its sentence-transformers config."""
        from engine.model_loader.pooling_config import load_pooling_config

        limit = self.config.model_config.max_model_len
        pooling = load_pooling_config(self.config.model_config.model)
        if pooling.max_seq_length is not None:
            limit = min(limit, pooling.max_seq_length)
        return limit

    def embedding_token_ids(self, prompts: abc.Sequence[str | abc.Sequence[int]]
                            ) -> list[list[int]]:
        """The token ids to embed for each prompt: texts are cut to
        `embed_max_length` tokens (as sentence-transformers does), token-id
        lists must be in the vocabulary and fit. Safe from any thread.

        Raises ValueError naming the input's index.
        """
        limit = self.embed_max_length
        texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
        out: list[list[int]] = [[] for _ in prompts]
        for i, text in texts:
            try:
                _check_text(text)
            except ValueError as exc:
                raise ValueError(f"input {i}: {exc}") from None
        if texts:
            # characters past what `limit` tokens can cover would be cut anyway
            cut = [text[: limit * self._longest_token_chars] for _, text in texts]
            for (i, _), ids in zip(texts, self.tokenizer.encode_batch(cut, max_length=limit),
                                   strict=True):
                try:
                    self._check_tokenizer_ids(ids)
                except ValueError as exc:
                    raise ValueError(f"input {i}: {exc}") from None
                out[i] = ids
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                continue
            try:
                out[i] = self.tokenize_prompt(p).token_ids  # the worker cuts to `limit`
            except ValueError as exc:
                raise ValueError(f"input {i}: {exc}") from None
        return out

    # ------------------------------------------------------------------ sleep mode

    @property
    def is_sleeping(self) -> bool:
        """True between `sleep` and `wake_up`."""
        return self.sleep_level > 0

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and the weights on every rank while idle (level 1:
        the weights go to a file and come back from it; level 2: they are
        discarded and reloaded from the checkpoint). The prefix cache is
        emptied. Requests are refused with `EngineSleepingError` until
        `wake_up`. Sleeping again only deepens the level.

        Raises ValueError when the engine was built without
        ``enable_sleep_mode=True``, for a level other than 1 or 2, or while
        requests are unfinished (finish or abort them first).
        """
        self._check_running()
        if not self.config.model_config.enable_sleep_mode:
            raise ValueError("sleep mode is off: build the engine with enable_sleep_mode=True")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self.requests:
            raise ValueError(f"cannot sleep with {len(self.requests)} unfinished request(s); "
                             "finish or abort them first")
        if self.scheduler is not None:
            self.scheduler.kv_cache.reset_prefix_cache()  # the blocks' contents go away
        self.executor.collective_rpc("sleep", (level,))
        self.sleep_level = max(self.sleep_level, level)

    def wake_up(self) -> None:
        """Bring the weights and an empty KV cache back on every rank (no-op
        when awake); the next request is served as before `sleep`."""
        self._check_running()
        if self.sleep_level:
            self.executor.collective_rpc("wake_up")
            self.sleep_level = 0

    def _check_running(self) -> None:
        if self._is_shut_down:
            raise EngineShutDownError(
                "the engine is shut down (LLM.shutdown(), or the end of its `with` block): "
                "nothing was queued; create a new LLM")

    def _check_awake(self) -> None:
        self._check_running()
        if self.sleep_level:
            raise EngineSleepingError(
                f"the engine is sleeping (level {self.sleep_level}); call wake_up() first")

    # ------------------------------------------------------------------ stats, end

    @property
    def spec_decoding_stats(self) -> Any:
        """Speculative decoding since the start: an `engine.spec_decode.stats.
        SpecDecodingCounts` (drafted and accepted tokens, accepted per position);
        None when the engine does not speculate."""
        if self.speculative_config is None or self.scheduler is None:
            return None
        return self.scheduler.spec_stats

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions if self.scheduler is not None else 0

    def shutdown(self) -> None:
        """Stop the workers and flush the stat loggers (idempotent). Requests
        after it raise `EngineShutDownError`."""
        self._is_shut_down = True
        stat_loggers, self.stat_loggers = self.stat_loggers, None
        if stat_loggers is not None:
            stat_loggers.shutdown()
        self.executor.shutdown()


def _quantized_layers_of_worker(worker: Any) -> dict[str, list[str]]:
    from engine.quantization import quantized_layers  # lazy: importing this module stays torch-free

    return quantized_layers(worker.model_runner.model)
