"""``POST /v1/chat/completions``: the messages are rendered with the request's or
the model's chat template, in a worker thread, then served like a completion."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.entrypoints import serving, streaming
from engine.entrypoints.compat import refuse_unsupported
from engine.entrypoints.errors import APIError
from engine.entrypoints.generation import generate
from engine.entrypoints.protocol import ChatCompletionRequest
from engine.tokenizer import ChatTemplateError

router = APIRouter()

# OpenAI's bound for chat; the engine's max_logprobs may be lower
CHAT_MAX_TOP_LOGPROBS = 20


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model, "generate")
    await refuse_unsupported(request, "chat")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if body.top_logprobs is not None and body.top_logprobs > CHAT_MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be <= {CHAT_MAX_TOP_LOGPROBS}, got "
                            f"{body.top_logprobs}", param="top_logprobs")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_tokens_field = ("max_completion_tokens" if body.max_completion_tokens
                        else "max_tokens" if body.max_tokens is not None else None)
    params = await serving.sampling_params(state.engine, body, max_tokens, top_logprobs)
    prompt = await asyncio.to_thread(chat_prompt, state.engine.engine, body)
    name = state.served_name(body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await generate(
        request, state.engine, [prompt], params, field="messages", stream=body.stream,
        lora_request=state.lora_request(body.model), max_tokens_field=max_tokens_field,
        chunks=partial(streaming.chat_chunks, model=name, n=body.n, top_logprobs=top_logprobs,
                       texts=state.token_texts, include_usage=include_usage),
        respond=lambda finals: serving.chat_response(finals[0], name, top_logprobs,
                                                     state.token_texts),
    )


def chat_prompt(llm_engine: Any, body: ChatCompletionRequest) -> Any:
    """The chat prompt, rendered with the request's or the model's template and
    tokenized (a `TokenizedPrompt`); 400 naming ``messages`` when the template
    fails or the prompt does not fit. Runs in a worker thread."""
    messages = []
    for i, message in enumerate(body.messages):
        try:
            item: dict[str, Any] = {"role": message.role, "content": message.text(i)}
        except ValueError as exc:
            raise APIError(400, str(exc), param=f"messages[{i}].content") from None
        if message.name is not None:
            item["name"] = message.name
        messages.append(item)
    tokenizer = llm_engine.tokenizer
    if not (body.chat_template or tokenizer.chat_template):
        raise APIError(400, "this model has no chat template (tokenizer_config.json "
                            "'chat_template' or chat_template.jinja); use /v1/completions, or "
                            "pass 'chat_template' in the request", param="messages")
    reserved = ("messages", "add_generation_prompt", "max_chars", *tokenizer.special_tokens_map)
    extra = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k not in reserved}
    try:
        # rendered as LLM.chat renders it, bounded by what fits in the context
        text = tokenizer.apply_chat_template(
            messages, chat_template=body.chat_template, tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            max_chars=llm_engine.max_prompt_chars, **extra)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    try:
        # the template already wrote the special tokens it wants
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        return llm_engine.tokenize_prompt(token_ids)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None
