"""From API requests to engine requests and from engine outputs to OpenAI JSON.

Plain functions over plain data: no web framework here. The route modules
(`engine.entrypoints.routes`) wire them to HTTP; streamed chunks are built in
`engine.entrypoints.streaming`.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from typing import Any

from engine.entrypoints.async_engine import AsyncEngine
from engine.entrypoints.errors import APIError
from engine.entrypoints.protocol import ChatCompletionRequest, CompletionRequest
from engine.entrypoints.structured import structured_error, structured_outputs_from

OBJECT_COMPLETION = "text_completion"
OBJECT_CHAT = "chat.completion"
OBJECT_CHAT_CHUNK = "chat.completion.chunk"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------- requests


# Seconds a request's constraint may take to compile and check before it is a
# 400 (`MAX_SOURCE_BYTES` keeps real schemas far below it).
STRUCTURED_CHECK_TIMEOUT = 30.0


async def sampling_params(engine: AsyncEngine, body: CompletionRequest | ChatCompletionRequest,
                          max_tokens: int | None, logprobs: int | None) -> Any:
    """The `SamplingParams` of a completion or chat request (400 naming the field
    for a bad value). Built in a worker thread, bounded by
    `STRUCTURED_CHECK_TIMEOUT`: compiling a structured-outputs constraint and
    checking that the engine can enforce it (`LLMEngine.check_structured_outputs`)
    may take a while, and the event loop keeps answering meanwhile."""

    def build() -> Any:
        params = _sampling_params(body, max_tokens, logprobs)
        try:
            engine.engine.check_limits(params)
        except ValueError as exc:
            raise APIError.bad_value(exc) from None
        try:
            engine.engine.check_structured_outputs(params)
        except ValueError as exc:
            raise _structured_error(exc, body) from None
        return params

    task = asyncio.ensure_future(asyncio.to_thread(build))
    done, _ = await asyncio.wait({task}, timeout=STRUCTURED_CHECK_TIMEOUT)
    if not done:
        # the thread finishes on its own and is ignored: the grammar compile it
        # waits for runs in a child process killed at the same limit
        # (structured_outputs.set_compile_time_limit)
        task.add_done_callback(lambda t: t.exception())
        raise APIError(400, f"the request's structured-outputs constraint did not compile "
                            f"within {STRUCTURED_CHECK_TIMEOUT:g} s",
                       param=_structured_field(body))
    return task.result()


def _structured_field(body: Any) -> str:
    return "structured_outputs" if getattr(body, "structured_outputs", None) is not None \
        else "response_format"


def _structured_error(exc: ValueError, body: Any) -> APIError:
    return structured_error(exc, _structured_field(body))


def _sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                     logprobs: int | None) -> Any:
    from engine.sampling_params import SamplingParams

    settings: dict[str, Any] = dict(
        n=body.n, max_tokens=max_tokens, stop=body.stop, seed=body.seed, logprobs=logprobs,
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        stop_token_ids=body.stop_token_ids, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        extra_args=body.extra_args, structured_outputs=structured_outputs_from(body),
    )
    optional = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty)
    settings.update({k: v for k, v in optional.items() if v is not None})
    if body.logit_bias:
        settings["logit_bias"] = _logit_bias(body.logit_bias)
    try:
        return SamplingParams(**settings)
    except ValueError as exc:
        raise APIError.bad_value(exc) from None


def _logit_bias(bias: dict[str, Any]) -> dict[int, Any]:
    """OpenAI's ``logit_bias`` (JSON keys are strings) with token-id keys; 400
    naming the field for a key that is not a token id."""
    out: dict[int, Any] = {}
    for key, value in bias.items():
        if not key.strip().isdigit():
            raise APIError(400, f"logit_bias keys must be token ids, got {key[:40]!r}",
                           param="logit_bias")
        out[int(key)] = value
    return out


# --------------------------------------------------------------------- logprobs


class TokenTexts:
    """Token id -> its text, for logprobs (memoized per server)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def completion_logprobs(texts: TokenTexts, token_ids: list[int],
                        entries: list[dict[int, float]], k: int, offset: int = 0) -> dict:
    """OpenAI's legacy completions ``logprobs`` object."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = texts(token_id)
        tokens.append(text)
        token_logprobs.append(entry.get(token_id))
        top_logprobs.append({texts(t): lp for t, lp in _top(entry, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, token_ids: list[int], entries: list[dict[int, float]],
                  k: int) -> dict:
    """OpenAI's chat ``logprobs`` object (``{"content": [...]}``)."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = texts(token_id)
        content.append({
            "token": text, "logprob": entry.get(token_id), "bytes": list(text.encode()),
            "top_logprobs": [{"token": texts(t), "logprob": lp, "bytes": list(texts(t).encode())}
                             for t, lp in _top(entry, k)],
        })
    return {"content": content}


# --------------------------------------------------------------------- responses


def usage(finals: list[Any]) -> dict[str, int]:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_response(finals: list[Any], model: str, n: int, logprobs: int | None,
                        texts: TokenTexts) -> dict:
    choices = []
    for i, out in enumerate(finals):
        for c in out.outputs:
            choices.append({
                "index": i * n + c.index, "text": c.text,
                "logprobs": (completion_logprobs(texts, c.token_ids, c.logprobs or [], logprobs)
                             if logprobs is not None else None),
                "finish_reason": c.finish_reason, **choice_error(c),
            })
    return {"id": new_id("cmpl"), "object": OBJECT_COMPLETION, "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(finals)}


def chat_response(final: Any, model: str, top_logprobs: int | None, texts: TokenTexts) -> dict:
    choices = []
    for c in final.outputs:
        choices.append({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": (chat_logprobs(texts, c.token_ids, c.logprobs or [], top_logprobs)
                         if top_logprobs is not None else None),
            "finish_reason": c.finish_reason, **choice_error(c),
        })
    return {"id": new_id("chatcmpl"), "object": OBJECT_CHAT, "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage([final])}


def choice_error(c: Any) -> dict:
    """``{"error": {...}}`` for a choice that ended with finish_reason "error"."""
    if c.error is None:
        return {}
    return {"error": {"message": c.error, "type": "server_error", "code": "generation_failed"}}


# --------------------------------------------------------------------- embeddings


def embedding_response(vectors: list[list[float]], num_tokens: int, model: str,
                       encoding_format: str) -> dict:
    data = []
    for i, vector in enumerate(vectors):
        if encoding_format == "base64":
            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


async def embed(engine: AsyncEngine, prompts: list[Any], dimensions: int | None = None,
                normalize: bool | None = None) -> tuple[list[list[float]], list[list[int]]]:
    """Embed texts or token-id lists: tokenized in a worker thread, pooled in the
    engine thread. Returns the vectors and the token ids that were embedded.
    `dimensions` keeps the first N values; `normalize=True` then L2-normalizes.

    Raises `APIError` 400 naming ``input`` or ``dimensions``.
    """
    from engine.pooling_params import PoolingParams

    try:
        token_ids = await asyncio.to_thread(engine.engine.embedding_token_ids, prompts)
    except ValueError as exc:
        raise APIError.bad_value(exc, "input") from None
    vectors = await engine.call(lambda llm: llm.llm_engine.embed(token_ids))
    if dimensions is not None or normalize:
        size = len(vectors[0]) if vectors else 0
        if dimensions is not None and dimensions > size:
            raise APIError(400, f"dimensions must be <= the model's {size}, got {dimensions}",
                           param="dimensions")
        try:
            params = PoolingParams(dimensions=dimensions, normalize=normalize)
        except ValueError as exc:
            raise APIError.bad_value(exc, "dimensions") from None
        vectors = [params.apply_to(v) for v in vectors]
    return vectors, token_ids
