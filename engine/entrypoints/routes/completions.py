"""``POST /v1/completions``."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.entrypoints import serving, streaming
from engine.entrypoints.errors import APIError
from engine.entrypoints.generation import generate
from engine.entrypoints.protocol import CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model, "generate")
    for name, bad in (("echo", body.echo), ("suffix", body.suffix),
                      ("best_of", body.best_of not in (None, body.n))):
        if bad:
            raise APIError(400, f"{name} is not supported by this server", param=name)
    params = serving.sampling_params(body, body.max_tokens, body.logprobs)
    name = state.settings.model_name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await generate(
        request, state.engine, body.prompt, params, field="prompt", stream=body.stream,
        chunks=partial(streaming.completion_chunks, model=name, n=body.n,
                       logprobs=body.logprobs, texts=state.token_texts,
                       include_usage=include_usage),
        respond=lambda finals: serving.completion_response(
            finals, name, body.n, body.logprobs, state.token_texts),
    )
