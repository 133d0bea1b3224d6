"""``POST /v1/completions``."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.entrypoints import serving, streaming
from engine.entrypoints.compat import (
    echo_chunks,
    echo_response,
    prompt_texts,
    refuse_unsupported,
)
from engine.entrypoints.errors import APIError
from engine.entrypoints.generation import generate
from engine.entrypoints.protocol import CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model, "generate")
    await refuse_unsupported(request, "completions")
    for name, bad in (("suffix", body.suffix),
                      ("best_of", body.best_of not in (None, body.n)),
                      ("echo", body.echo and body.logprobs is not None)):
        if bad:
            what = "echo with logprobs" if name == "echo" else name
            raise APIError(400, f"{what} is not supported by this server", param=name)
    params = await serving.sampling_params(state.engine, body, body.max_tokens, body.logprobs)
    # left out, max_tokens is the default 16, cut to what the context leaves
    max_tokens_field = ("max_tokens" if "max_tokens" in body.model_fields_set
                        and body.max_tokens is not None else None)
    name = state.served_name(body.model)
    lora = state.lora_request(body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = partial(streaming.completion_chunks, model=name, n=body.n,
                     logprobs=body.logprobs, texts=state.token_texts,
                     include_usage=include_usage)

    def respond(finals: list) -> dict:
        return serving.completion_response(finals, name, body.n, body.logprobs,
                                           state.token_texts)

    if body.echo:  # each text starts with its prompt
        echoed = prompt_texts(body.prompt, state.engine.engine.tokenizer)
        return await generate(
            request, state.engine, body.prompt, params, field="prompt", stream=body.stream,
            lora_request=lora, max_tokens_field=max_tokens_field,
            chunks=lambda streams: echo_chunks(chunks(streams), echoed, body.n),
            respond=lambda finals: echo_response(respond(finals), echoed, body.n),
        )
    return await generate(
        request, state.engine, body.prompt, params, field="prompt", stream=body.stream,
        chunks=chunks, respond=respond, lora_request=lora, max_tokens_field=max_tokens_field,
    )
