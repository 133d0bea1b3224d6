"""``POST /tokenize`` and ``POST /detokenize``: the served model's tokenizer over
HTTP. ``/tokenize`` takes a ``prompt`` (text) or chat ``messages`` (rendered with
the same template and code as ``/v1/chat/completions``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import field_validator
from starlette.responses import JSONResponse, Response

from engine.entrypoints.errors import APIError
from engine.entrypoints.protocol import ChatCompletionRequest, ChatMessage, _Body

router = APIRouter()


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # for `prompt`; a chat template writes its own
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        return value


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model)
    llm_engine = state.engine.engine
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")

    def run() -> list[int]:
        if body.messages is not None:
            from engine.entrypoints.routes.chat import chat_prompt

            chat = ChatCompletionRequest(
                messages=body.messages, add_generation_prompt=body.add_generation_prompt,
                chat_template=body.chat_template, chat_template_kwargs=body.chat_template_kwargs)
            return list(chat_prompt(llm_engine, chat).token_ids)
        if len(body.prompt) > llm_engine.max_prompt_chars:
            raise APIError(400, "prompt: longer than fits in the model's context",
                           param="prompt")
        return llm_engine.tokenizer.encode(body.prompt,
                                           add_special_tokens=body.add_special_tokens)

    tokens = await asyncio.to_thread(run)
    result: dict[str, Any] = {"count": len(tokens),
                              "max_model_len": llm_engine.config.model_config.max_model_len,
                              "tokens": tokens}
    if body.return_token_strs:
        result["token_strs"] = llm_engine.tokenizer.convert_ids_to_tokens(tokens)
    return JSONResponse(result)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model)
    tokenizer = state.engine.engine.tokenizer
    size = tokenizer.vocab_size
    bad = next((t for t in body.tokens if t >= size), None)
    if bad is not None:
        raise APIError(400, f"tokens: id {bad} is outside the vocabulary (size {size})",
                       param="tokens")
    text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
    return JSONResponse({"prompt": text})
