"""The one generation path of the HTTP server, shared by `/v1/completions` and
`/v1/chat/completions`: tokenize and check the prompts off the event loop, queue
them, then answer with server-sent events or one JSON body, aborting the
requests when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.entrypoints.async_engine import AsyncEngine, EngineUnavailableError, RequestStream
from engine.entrypoints.errors import APIError
from engine.entrypoints.streaming import final_outputs
from engine.lora import LoRAAdapterError

if TYPE_CHECKING:
    from engine.core.engine import TokenizedPrompt


async def generate(
    request: Request,
    engine: AsyncEngine,
    prompts: list[Any],
    params: Any,
    *,
    field: str,
    stream: bool,
    chunks: Callable[[list[RequestStream]], AsyncIterator[dict]],
    respond: Callable[[list[Any]], dict],
    lora_request: Any = None,
    max_tokens_field: str | None = None,
) -> Response:
    """Serve one generation request.

    Args:
        prompts: texts, token-id lists or `TokenizedPrompt`s (one request each).
        field: the body field the prompts came from, named in a 400.
        stream: answer with server-sent events built by ``chunks(streams)``;
            otherwise with ``respond(final outputs)`` as JSON.
        lora_request: the `engine.LoRARequest` every prompt runs with (None: the base model).
        max_tokens_field: the body field that set ``params.max_tokens``, when the
            client set it: a prompt that leaves less room than that in the context
            is a 400 naming it. None when the client left it out (generation stops
            at the end of the context).
    """
    tokenized = await tokenize(engine, prompts, field)
    max_model_len = engine.engine.config.model_config.max_model_len
    if max_tokens_field is not None and max_model_len is not None:
        check_room(tokenized, params.max_tokens, max_model_len, max_tokens_field, field)
    streams = await add_requests(engine, tokenized, params, field, lora_request)
    if stream:
        return sse(chunks(streams))

    async def collect() -> Response:
        return JSONResponse(respond(await final_outputs(streams)))

    return await until_disconnect(request, collect())


async def tokenize(engine: AsyncEngine, prompts: list[Any], field: str) -> list[TokenizedPrompt]:
    """Tokenize and check the prompts in a worker thread (neither the event loop
    nor the engine's step thread waits for a long prompt); 400 naming the prompt."""
    llm_engine = engine.engine

    def run() -> list[TokenizedPrompt]:
        out = []
        for i, prompt in enumerate(prompts):
            try:
                out.append(llm_engine.tokenize_prompt(prompt))
            except ValueError as exc:
                raise _prompt_error(exc, field, i, len(prompts)) from None
        return out

    return await asyncio.to_thread(run)


def check_room(prompts: list[TokenizedPrompt], max_tokens: int, max_model_len: int,
               max_tokens_field: str, field: str) -> None:
    """400 naming `max_tokens_field` when a prompt and `max_tokens` new tokens
    do not fit in the context: a client that asked for that many tokens gets an
    error, not an answer silently cut at the context's end."""
    for i, prompt in enumerate(prompts):
        room = max_model_len - len(prompt.token_ids)
        if max_tokens > room:
            where = f"{field}[{i}]" if len(prompts) > 1 else field
            raise APIError(400, f"{max_tokens_field}={max_tokens} does not fit: {where} has "
                                f"{len(prompt.token_ids)} tokens and the context "
                                f"max_model_len={max_model_len} leaves room for "
                                f"{max(room, 0)} more", param=max_tokens_field)


async def add_requests(engine: AsyncEngine, prompts: list[Any], params: Any,
                       field: str, lora_request: Any = None) -> list[RequestStream]:
    """Queue one request per prompt; on any failure abort those already queued
    and answer 400 naming the field (a sampling setting, else the prompt)."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            try:
                streams.append(await engine.add_request(prompt, params,
                                                        lora_request=lora_request))
            except LoRAAdapterError as exc:  # the adapter, not the prompt
                raise APIError(400, str(exc), param="model") from None
            except ValueError as exc:
                raise _prompt_error(exc, field, i, len(prompts)) from None
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


def _prompt_error(exc: ValueError, field: str, index: int, count: int) -> APIError:
    error = APIError.bad_value(exc)
    if error.param is not None:  # a sampling setting (SamplingParams.seed ...)
        return error
    where = f"{field}[{index}]" if count > 1 else field
    return APIError(400, f"{where}: {exc}", param=field)


async def until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`; cancel it (its streams abort, freeing their KV blocks) when
    the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return Response(status_code=499)  # nobody reads it


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per event, then ``data: [DONE]``.
    A failure after the first byte becomes an error event (the status is sent)."""

    async def body() -> AsyncIterator[str]:
        from engine.core.engine import RequestFailedError

        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except EngineUnavailableError as exc:
            error = APIError(503, str(exc), code=f"engine_{exc.state}")
            yield f"data: {json.dumps(error.payload())}\n\n"
        except RequestFailedError as exc:
            error = APIError(500, str(exc), code="request_failed")
            yield f"data: {json.dumps(error.payload())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
