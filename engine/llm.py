"""`LLM`: the offline entry point — build an engine, generate, embed."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig
from engine.engine_args import EngineArgs, default_model_dir, engine_args_signature
from engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput

if TYPE_CHECKING:  # pragma: no cover
    from engine.lora import LoRARequest
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer

Prompt = str | Sequence[int]

__all__ = ["LLM", "default_model_dir"]


class LLM:
    """A model served in this process: `generate` text or `embed` it.

    Every keyword argument is a field of `engine.engine_args.EngineArgs` (its
    docstring-like help texts are the reference; ``help(LLM)`` lists them all):
    ``platform``, ``tensor_parallel_size``, ``attention_backend``,
    ``io_processor_plugin``, ``plugin_dirs``, ``dtype``, ``seed``, ``log_stats``,
    ``block_size``, ``kv_cache_memory``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``enable_prefix_caching``, ``enable_chunked_prefill``, ``max_model_len``, ...

    Args:
        model: a Hugging Face-format folder (``config.json``, ``*.safetensors``,
            ``tokenizer.json``); None: the embedded default model.

    Raises ValueError for bad settings (naming the setting), TypeError for an
    unknown keyword, FileNotFoundError for a missing model.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        if model is not None:
            model = os.fspath(model)
        if "plugin_dirs" in kwargs:
            kwargs["plugin_dirs"] = tuple(os.fspath(d) for d in kwargs["plugin_dirs"])
        try:
            args = EngineArgs(model=model, **kwargs)
        except TypeError as exc:
            raise TypeError(f"LLM(): {exc}") from None
        self.engine_args = args
        args.apply_process_settings()
        config = args.create_engine_config()
        from engine.core.engine import LLMEngine

        self.llm_engine = LLMEngine(config)
        try:
            from engine.io_processors import get_io_processor

            # a named plugin that does not exist fails here, at start
            self.io_processor = get_io_processor(config, args.io_processor_plugin)
        except BaseException:
            self.llm_engine.shutdown()
            raise

    __init__.__signature__ = engine_args_signature(  # type: ignore[attr-defined]
        (inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)))

    @property
    def config(self) -> EngineConfig:
        return self.llm_engine.config

    def get_tokenizer(self) -> Tokenizer:
        """The model's `engine.tokenizer.Tokenizer`."""
        return self.llm_engine.tokenizer

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; returns one `RequestOutput` per prompt, in order.

        Args:
            prompts: a string, a list of strings, a list of token ids, or a list
                of token-id lists.
            sampling_params: one `SamplingParams` for all prompts, a list with one
                per prompt, or None for the defaults.
            use_tqdm: show a progress bar.
            lora_request: a `LoRARequest` for all prompts, a list with one (or
                None: the base model) per prompt, or None (needs enable_lora).

        Raises ValueError naming the prompt's index when a prompt is unusable
        (empty, longer than the context, too big for the KV cache); nothing of
        that call is run, and the engine stays usable.
        """
        prompts = _as_prompt_list(prompts)
        params_list = self._params_list(sampling_params, len(prompts))
        loras = _lora_list(lora_request, len(prompts))
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                try:
                    ids.append(engine.add_request(prompt, params, lora_request=loras[i]))
                except ValueError as exc:
                    raise ValueError(f"prompt {i}: {exc}") from None
            return self._run(ids, use_tqdm)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                        lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding a `RequestOutput` snapshot after every
        engine step (``outputs[i].text_delta`` is the new text, empty after a step
        that added none: a chunk of a long prompt, or a step of other requests;
        the last snapshot has ``finished`` set). Closing the iterator, or leaving a
        ``for`` loop over it, aborts the request: a long prompt can be stopped
        between its prompt steps, before its first token."""
        engine = self.llm_engine
        params = self._params_list(sampling_params, 1)[0]
        request_id = engine.add_request(_as_prompt_list(prompt)[0], params,
                                        lora_request=lora_request)
        done = False
        try:
            while not done:
                mine = next((out for out in engine.step() if out.request_id == request_id),
                            None)
                if mine is None:  # the step added nothing to this request
                    if request_id not in engine.requests:
                        return  # aborted by another caller of the engine
                    mine = engine.request_snapshot(request_id)
                done = mine.finished
                yield mine
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
    def _params_list(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                     count: int) -> list[SamplingParams]:
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

    # ------------------------------------------------------------------ chat

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation or a batch of them.

        Args:
            messages: one conversation (a list of ``{"role", "content"}`` dicts)
                or a list of conversations.
            sampling_params: as for `generate` (one for all, or one per conversation).
            chat_template: a Jinja template to use instead of the model's own.
            add_generation_prompt: end the prompt with the assistant's header.
            chat_template_kwargs: extra variables the template sees.
            lora_request: as for `generate`.

        The prompt is rendered as transformers' ``apply_chat_template`` renders it
        (`engine.tokenizer.Tokenizer.apply_chat_template`); ``.prompt`` of each
        output is that text. Returns one `RequestOutput` per conversation. Raises
        ValueError when the model has no chat template or a conversation is malformed.
        """
        conversations = _as_conversations(messages)
        tokenizer = self.get_tokenizer()
        texts = [
            tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
            for conversation in conversations
        ]
        prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        outputs = self.generate(prompt_ids, sampling_params, use_tqdm=use_tqdm,
                                lora_request=lora_request)
        for out, text in zip(outputs, texts, strict=True):
            out.prompt = text
        return outputs

    # ------------------------------------------------------------------ embed

    def embed(self, texts: str | Sequence[str]) -> list[EmbeddingRequestOutput]:
        """Embed each text with the model's pooling (``.outputs.embedding``).
        Raises ValueError naming the input for text that is not valid Unicode."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        # cut to the model's embedding length, as sentence-transformers does
        token_ids = self.llm_engine.embedding_token_ids(texts)
        vectors = self.llm_engine.embed(token_ids) if texts else []
        return [
            EmbeddingRequestOutput(
                request_id=str(i), prompt=text, prompt_token_ids=ids,
                outputs=EmbeddingOutput(embedding=vec),
            )
            for i, (text, ids, vec) in enumerate(zip(texts, token_ids, vectors, strict=True))
        ]

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

    # ------------------------------------------------------------------ sleep mode

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and the weights until `wake_up` (needs
        ``enable_sleep_mode=True``): level 1 keeps the weights in a file, level
        2 discards them (reloaded from the checkpoint). See
        `engine.core.engine.LLMEngine.sleep` for what it raises."""
        self.llm_engine.sleep(level)

    def wake_up(self) -> None:
        """Undo `sleep`; the next request gives the same output as before it."""
        self.llm_engine.wake_up()

    def is_sleeping(self) -> bool:
        """True between `sleep` and `wake_up`."""
        return self.llm_engine.is_sleeping

    # ------------------------------------------------------------------ end

    def shutdown(self) -> None:
        """Stop the engine's workers (also done when the interpreter exits)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _lora_list(lora_request: Any, count: int) -> list[Any]:
    """One adapter (or None) per prompt, from one for all or a list of them."""
    if lora_request is None or not isinstance(lora_request, Sequence):
        return [lora_request] * count
    loras = list(lora_request)
    if len(loras) != count:
        raise ValueError(f"lora_request has {len(loras)} entries for {count} prompts; "
                         "give one for all or one per prompt")
    return loras


def _as_conversations(messages: Any) -> list[list[dict[str, Any]]]:
    """One conversation or a list of them, as a list of conversations."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a conversation (a non-empty list of "
                         "{'role', 'content'} dicts) or a list of conversations")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    for i, conversation in enumerate(conversations):
        if (isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence)
                or not all(isinstance(m, dict) and "role" in m for m in conversation)):
            raise ValueError(f"conversation {i} must be a list of {{'role', 'content'}} dicts, "
                             f"got {conversation!r:.80}")
    return [list(c) for c in conversations]


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
