"""OpenAI-surface details shared by the generation routes: fields OpenAI defines
that this server does not implement are refused with a 400 naming them (never
silently ignored), and ``echo`` for completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from engine.entrypoints.errors import APIError

# OpenAI request fields this server does not implement, per route. A field that
# is absent, null, empty or "none" asks for nothing and passes.
UNSUPPORTED = {
    "chat": ("tools", "tool_choice", "functions", "function_call", "audio",
             "modalities", "prediction", "parallel_tool_calls", "web_search_options",
             "reasoning_effort", "echo"),
    "completions": (),
}
_NOTHING: tuple[object, ...] = (None, [], {}, "none", False)


async def refuse_unsupported(request: Request, route: str) -> None:
    """400 naming the first field of `route`'s `UNSUPPORTED` list the body sets."""
    try:
        body = await request.json()  # starlette keeps the body FastAPI already read
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    for name in UNSUPPORTED[route]:
        if name in body and body[name] not in _NOTHING:
            raise APIError(400, f"{name} is not supported by this server", param=name)


def prompt_texts(prompts: list[Any], tokenizer: Any) -> list[str]:
    """The text of each completion prompt (token-id prompts decoded), for ``echo``."""
    return [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
            for p in prompts]


def echo_response(response: dict, texts: list[str], n: int) -> dict:
    """A completion response whose texts start with their prompt (``echo``)."""
    for choice in response["choices"]:
        choice["text"] = texts[choice["index"] // n] + choice["text"]
    return response


async def echo_chunks(chunks: AsyncIterator[dict], texts: list[str],
                      n: int) -> AsyncIterator[dict]:
    """Streamed completion chunks, each choice's first one starting with its
    prompt (``echo``)."""
    started: set[int] = set()
    async for chunk in chunks:
        for choice in chunk.get("choices", ()):
            index = choice["index"]
            if index not in started:
                started.add(index)
                choice["text"] = texts[index // n] + choice["text"]
        yield chunk
