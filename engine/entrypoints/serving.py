"""From API requests to engine requests and from engine outputs to OpenAI JSON.

Plain functions over plain data: no web framework here. `api_server` wires them
to routes.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from engine.entrypoints.async_engine import AsyncEngine, RequestStream
from engine.entrypoints.errors import APIError
from engine.entrypoints.protocol import ChatCompletionRequest, CompletionRequest

OBJECT_COMPLETION = "text_completion"
OBJECT_CHAT = "chat.completion"
OBJECT_CHAT_CHUNK = "chat.completion.chunk"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------- requests


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                    logprobs: int | None) -> Any:
    """The `SamplingParams` of a completion or chat request (400 naming the field
    for a bad value)."""
    from engine.sampling_params import SamplingParams

    settings: dict[str, Any] = dict(
        n=body.n, max_tokens=max_tokens, stop=body.stop, seed=body.seed, logprobs=logprobs,
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        stop_token_ids=body.stop_token_ids, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )
    optional = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty)
    settings.update({k: v for k, v in optional.items() if v is not None})
    try:
        return SamplingParams(**settings)
    except ValueError as exc:
        raise APIError.bad_value(exc) from None


async def add_requests(engine: AsyncEngine, prompts: list[Any], params: Any,
                       field: str) -> list[RequestStream]:
    """Queue one request per prompt; on any failure abort those already queued
    and answer 400 naming the prompt."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            try:
                streams.append(await engine.add_request(prompt, params))
            except ValueError as exc:
                where = f"{field}[{i}]" if len(prompts) > 1 else field
                raise APIError(400, f"{where}: {exc}", param=field) from None
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


async def batches(streams: list[RequestStream]) -> AsyncIterator[list[tuple[int, Any]]]:
    """``(prompt index, snapshot)`` pairs of every stream as they come, grouped:
    whatever is already waiting is taken together, so a slow reader catches up in
    one chunk. Aborts the unfinished streams when the consumer stops early."""
    try:
        if len(streams) == 1:
            stream = streams[0]
            async for first in stream:
                yield [(0, first), *((0, out) for out in stream.take_ready())]
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((index, out))
            except BaseException as exc:
                merged.put_nowait((index, exc))
                raise
            merged.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_streams = len(streams)
            while open_streams:
                items = [await merged.get()]
                while not merged.empty():
                    items.append(merged.get_nowait())
                batch = []
                for index, item in items:
                    if item is None:
                        open_streams -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.append((index, item))
                if batch:
                    yield batch
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.abort()


async def final_outputs(streams: list[RequestStream]) -> list[Any]:
    """The last snapshot of every stream, in prompt order."""
    last: dict[int, Any] = {}
    async for batch in batches(streams):
        for index, out in batch:
            last[index] = out
    return [last[i] for i in range(len(streams))]


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
                "finish_reason": c.finish_reason,
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
            "finish_reason": c.finish_reason,
        })
    return {"id": new_id("chatcmpl"), "object": OBJECT_CHAT, "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage([final])}


class _ChoiceCursor:
    """What one choice has streamed so far."""

    __slots__ = ("tokens", "text_offset", "done", "started")

    def __init__(self) -> None:
        self.tokens = 0
        self.text_offset = 0  # characters of token text already streamed (logprobs)
        self.done = False
        self.started = False


async def stream_events(streams: list[RequestStream], *, chat: bool, model: str, n: int,
                        logprobs: int | None, texts: TokenTexts,
                        include_usage: bool) -> AsyncIterator[dict]:
    """The chunk objects of a streamed completion or chat completion."""
    response_id = new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    cursors: dict[int, _ChoiceCursor] = {}
    last: dict[int, Any] = {}
    base = {"id": response_id, "object": OBJECT_CHAT_CHUNK if chat else OBJECT_COMPLETION,
            "created": created, "model": model}
    async for batch in batches(streams):
        deltas: dict[int, str] = {}
        latest: dict[int, Any] = {}
        for index, out in batch:
            last[index] = out
            for c in out.outputs:
                key = index * n + c.index
                deltas[key] = deltas.get(key, "") + c.text_delta
                latest[key] = c
        choices = []
        for key, c in latest.items():
            cursor = cursors.setdefault(key, _ChoiceCursor())
            if cursor.done:
                continue
            new_tokens = c.token_ids[cursor.tokens:]
            text = deltas[key]
            if not text and not c.finished and not (chat and not cursor.started):
                continue
            choice: dict[str, Any] = {"index": key}
            if chat:
                delta: dict[str, Any] = {"content": text} if text else {}
                if not cursor.started:
                    delta = {"role": "assistant", "content": text}
                choice["delta"] = delta
            else:
                choice["text"] = text
            choice["logprobs"] = None
            if logprobs is not None and new_tokens:
                entries = (c.logprobs or [])[cursor.tokens:]
                if chat:
                    choice["logprobs"] = chat_logprobs(texts, new_tokens, entries, logprobs)
                else:
                    choice["logprobs"] = completion_logprobs(texts, new_tokens, entries, logprobs,
                                                             cursor.text_offset)
                    cursor.text_offset += sum(len(t) for t in choice["logprobs"]["tokens"])
            choice["finish_reason"] = c.finish_reason
            cursor.tokens = len(c.token_ids)
            cursor.started = True
            cursor.done = c.finished
            choices.append(choice)
        if choices:
            yield {**base, "choices": choices}
    if include_usage:
        yield {**base, "choices": [], "usage": usage([last[i] for i in sorted(last)])}


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


def embed_prompts(llm: Any, prompts: list[Any], dimensions: int | None = None,
                  normalize: bool | None = None) -> tuple[list[list[float]], list[list[int]]]:
    """Embed texts or token-id lists (runs in the engine thread); returns the
    vectors and the token ids that were embedded. `dimensions` keeps the first N
    values; `normalize=True` then L2-normalizes."""
    from engine.pooling_params import PoolingParams

    engine = llm.llm_engine
    if "embed" not in engine.supported_tasks:
        raise ValueError(
            f"the model {engine.config.model_config.model!r} is not an embedding model "
            f"(it serves: {', '.join(engine.supported_tasks)})"
        )
    if all(isinstance(p, str) for p in prompts):
        outputs = llm.embed(prompts)
        vectors = [out.outputs.embedding for out in outputs]
        token_ids = [out.prompt_token_ids for out in outputs]
    else:
        limit = engine.config.model_config.max_model_len
        token_ids = [p if isinstance(p, list) else engine.tokenizer.encode(p) for p in prompts]
        for i, ids in enumerate(token_ids):
            if len(ids) > limit:
                raise ValueError(f"input {i} has {len(ids)} tokens, more than the model's "
                                 f"maximum of {limit}")
        vectors = engine.embed(token_ids)
    if dimensions is not None or normalize:
        size = len(vectors[0]) if vectors else 0
        if dimensions is not None and dimensions > size:
            raise ValueError(f"PoolingParams.dimensions must be <= the model's {size}, "
                             f"got {dimensions}")
        params = PoolingParams(dimensions=dimensions, normalize=normalize)
        vectors = [params.apply_to(v) for v in vectors]
    return vectors, token_ids
