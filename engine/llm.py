"""`LLM`: the offline entry point — build an engine, generate, embed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.config import (
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

Prompt = str | Sequence[int]


def default_model_dir() -> Path:
    """The embedded default model's folder. Raises FileNotFoundError when this
    installation has none."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"no model given and the embedded default model is missing ({DEFAULT_MODEL_DIR}); "
            "pass a Hugging Face-format model folder (config.json, *.safetensors, tokenizer.json)"
        )
    return DEFAULT_MODEL_DIR


class LLM:
    """A model served in this process: `generate` text or `embed` it.

    Args:
        model: a Hugging Face-format folder (``config.json``, ``*.safetensors``,
            ``tokenizer.json``); None: the embedded default model.
        platform: use this platform plugin (sets ``ENGINE_PLATFORM``).
        tensor_parallel_size: ranks to shard the model over (one process each).
        attention_backend: an `AttentionBackendEnum` name (default: the platform's).
        io_processor_plugin: the IO-processor plugin `encode` uses (default: the
            ``io_processor_plugin`` key of the model's ``config.json``, if any).
        plugin_dirs: extra plugin folders (reach every engine process).
        dtype: "auto", "float32", "bfloat16" or "float16".
        seed: seeds the global generators (unseeded sampling, weight init).
        log_stats: turn the stat loggers on.
        block_size: tokens per KV-cache block.
        kv_cache_memory: bytes for the KV cache (default: a fraction of memory,
            ``kv_cache_memory_fraction``).
        max_num_seqs: sequences in one step at most.
        max_num_batched_tokens: token budget of one step (default 4096, or the
            context length when chunked prefill is off).
        enable_prefix_caching: reuse the KV blocks of repeated prompt prefixes.
        enable_chunked_prefill: split long prompts over several steps.
        max_model_len: serve a shorter context than the model's.

    Raises ValueError for bad settings, FileNotFoundError for a missing model.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        platform: str | None = None,
        tensor_parallel_size: int = 1,
        attention_backend: str | None = None,
        io_processor_plugin: str | None = None,
        plugin_dirs: Iterable[str | os.PathLike[str]] = (),
        dtype: str = "auto",
        seed: int = 0,
        log_stats: bool = False,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        kv_cache_memory_fraction: float = 0.25,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        long_prefill_token_threshold: int = 0,
        custom_ops: list[str] | None = None,
        worker_cls: str = "auto",
    ) -> None:
        if platform is not None:
            from engine.platforms import reset_current_platform

            os.environ["ENGINE_PLATFORM"] = platform
            reset_current_platform()  # a platform resolved earlier in this process is stale
        plugin_dirs = [os.fspath(d) for d in plugin_dirs]
        if plugin_dirs:
            import registry

            registry.add_plugin_dirs(plugin_dirs)
        config = _build_config(
            model=model, tensor_parallel_size=tensor_parallel_size,
            attention_backend=attention_backend, io_processor_plugin=io_processor_plugin,
            dtype=dtype, seed=seed, log_stats=log_stats, block_size=block_size,
            kv_cache_memory=kv_cache_memory, kv_cache_memory_fraction=kv_cache_memory_fraction,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len,
            long_prefill_token_threshold=long_prefill_token_threshold,
            custom_ops=custom_ops, worker_cls=worker_cls,
        )
        from engine.core.engine import LLMEngine

        self.llm_engine = LLMEngine(config)
        try:
            from engine.io_processors import get_io_processor

            # a named plugin that does not exist fails here, at start
            self.io_processor = get_io_processor(config, io_processor_plugin)
        except BaseException:
            self.llm_engine.shutdown()
            raise

    @property
    def config(self) -> EngineConfig:
        return self.llm_engine.config

    def get_tokenizer(self) -> Any:
        """The model's `engine.tokenizer.Tokenizer`."""
        return self.llm_engine.tokenizer

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: Any = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt; returns one `RequestOutput` per prompt, in order.

        Args:
            prompts: a string, a list of strings, a list of token ids, or a list
                of token-id lists.
            sampling_params: one `SamplingParams` for all prompts, a list with one
                per prompt, or None for the defaults.
            use_tqdm: show a progress bar.

        Raises ValueError naming the prompt's index when a prompt is unusable
        (empty, longer than the context, too big for the KV cache); nothing of
        that call is run, and the engine stays usable.
        """
        prompts = _as_prompt_list(prompts)
        params_list = self._params_list(sampling_params, len(prompts))
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                try:
                    ids.append(engine.add_request(prompt, params))
                except ValueError as exc:
                    raise ValueError(f"prompt {i}: {exc}") from None
            return self._run(ids, use_tqdm)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise

    def generate_stream(self, prompt: Prompt, sampling_params: Any = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding a `RequestOutput` snapshot after every
        step that added tokens (``outputs[i].text_delta`` is the new text; the last
        snapshot has ``finished`` set). Closing the iterator aborts the request."""
        engine = self.llm_engine
        params = self._params_list(sampling_params, 1)[0]
        request_id = engine.add_request(_as_prompt_list(prompt)[0], params)
        done = False
        try:
            while not done:
                for out in engine.step():
                    if out.request_id == request_id:
                        done = out.finished
                        yield out
        finally:
            if not done:
                engine.abort_request(request_id)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    @staticmethod
    def _params_list(sampling_params: Any, count: int) -> list[Any]:
        from engine.sampling_params import SamplingParams

        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(
                f"sampling_params has {len(params)} entries for {count} prompts; "
                "give one for all or one per prompt"
            )
        return params

    # ------------------------------------------------------------------ embed

    def embed(self, texts: str | Sequence[str]) -> list[EmbeddingRequestOutput]:
        """Embed each text with the model's pooling (``.outputs.embedding``)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        tokenizer = self.llm_engine.tokenizer
        token_ids = tokenizer.encode_batch(texts, max_length=self._embed_max_length())
        vectors = self.llm_engine.embed(token_ids) if texts else []
        return [
            EmbeddingRequestOutput(
                request_id=str(i), prompt=text, prompt_token_ids=ids,
                outputs=EmbeddingOutput(embedding=vec),
            )
            for i, (text, ids, vec) in enumerate(zip(texts, token_ids, vectors, strict=True))
        ]

    def _embed_max_length(self) -> int:
        from engine.pooling import load_pooling_config

        pooling = load_pooling_config(self.config.model_config.model)
        limit = self.config.model_config.max_model_len
        if pooling.max_seq_length is not None:
            limit = min(limit, pooling.max_seq_length)
        return limit

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        data: Any,
        pooling_task: str = "plugin",
        pooling_params: Any = None,
        request_id: str | None = None,
    ) -> Any:
        """Run ``data`` through the IO-processor plugin: parse, pre-process, pool,
        post-process. Returns exactly what the plugin's ``post_process`` returned.

        Raises ValueError when no IO processor is configured, and
        `engine.io_processors.IOProcessorError` when the plugin fails on this
        request (the engine keeps serving).
        """
        from engine.io_processors import process_request

        if pooling_task != "plugin":
            raise ValueError(f"pooling_task must be 'plugin', got {pooling_task!r}")
        if self.io_processor is None:
            raise ValueError(
                "no IO-processor plugin is configured: pass LLM(io_processor_plugin=NAME) "
                "or set 'io_processor_plugin' in the model's config.json"
            )

        def pool(prompts: Any, params: Any) -> list[EmbeddingRequestOutput]:
            outputs = self.embed(prompts)
            for out in outputs:
                out.outputs.embedding = params.apply_to(out.outputs.embedding)
            return outputs

        return process_request(self.io_processor, data, pool, pooling_params, request_id)

    # ------------------------------------------------------------------ end

    def shutdown(self) -> None:
        """Stop the engine's workers (also done when the interpreter exits)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    for i, p in enumerate(prompts):
        if not isinstance(p, str) and not (
            isinstance(p, Sequence) and all(isinstance(t, int) for t in p)
        ):
            raise TypeError(
                f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}"
            )
    return prompts


def _build_config(*, model: Any, tensor_parallel_size: int, attention_backend: str | None,
                  io_processor_plugin: str | None, dtype: str, seed: int, log_stats: bool,
                  block_size: int, kv_cache_memory: int | None,
                  kv_cache_memory_fraction: float, max_num_seqs: int,
                  max_num_batched_tokens: int | None, enable_prefix_caching: bool,
                  enable_chunked_prefill: bool, max_model_len: int | None,
                  long_prefill_token_threshold: int, custom_ops: list[str] | None,
                  worker_cls: str) -> EngineConfig:
    from engine.core.engine import resolve_max_model_len
    from engine.model_loader import load_hf_config

    model_dir = Path(model) if model is not None else default_model_dir()
    hf_config = load_hf_config(model_dir)
    for name, value, low in (("tensor_parallel_size", tensor_parallel_size, 1),
                             ("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if kv_cache_memory is not None and kv_cache_memory <= 0:
        raise ValueError(f"kv_cache_memory must be > 0 bytes, got {kv_cache_memory!r}")
    if not 0 < kv_cache_memory_fraction <= 1:
        raise ValueError(
            f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction!r}"
        )
    max_model_len = resolve_max_model_len(hf_config, max_model_len)
    if max_num_batched_tokens is None:
        max_num_batched_tokens = 4096 if enable_chunked_prefill else max(4096, max_model_len)
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    return EngineConfig(
        model_config=ModelConfig(
            model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
            hf_config=hf_config, io_processor_plugin=io_processor_plugin,
        ),
        cache_config=CacheConfig(
            block_size=block_size, kv_cache_memory=kv_cache_memory,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            long_prefill_token_threshold=long_prefill_token_threshold,
        ),
        parallel_config=ParallelConfig(
            tensor_parallel_size=tensor_parallel_size, worker_cls=worker_cls
        ),
        compilation_config=CompilationConfig(custom_ops=custom_ops or ["all"]),
        attention_backend=attention_backend,
        log_stats=log_stats,
    )
