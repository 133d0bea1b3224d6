"""An example route plugin, mounted by `engine serve` under ``/plugins/status/``
once enabled (``--enable-route-plugin status`` or ``ENGINE_PLUGINS=api_route:status``):

- ``GET /plugins/status/summary``: engine state, KV-cache usage, unfinished
  requests and the model's context length;
- ``POST /plugins/status/complete`` with ``{"prompt": "...", "max_tokens": 8}``:
  a greedy completion, returned in one JSON object.

Handlers use only the documented surface of ``request.app.state.engine``.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

__all__ = ["make_router"]


class CompleteBody(BaseModel):
    prompt: str | list[int]
    max_tokens: int = Field(default=8, ge=1, le=256)


def make_router() -> APIRouter:
    """The plugin's value: called once when the server mounts it."""
    router = APIRouter()

    @router.get("/summary")
    async def summary(request: Request) -> dict:
        engine = request.app.state.engine
        info = {"state": engine.state, "kv_cache_usage": engine.kv_cache_usage,
                "num_unfinished_requests": engine.num_unfinished_requests}
        if engine.ready:
            info["max_model_len"] = engine.engine.config.model_config.max_model_len
        return info

    @router.post("/complete")
    async def complete(body: CompleteBody, request: Request) -> dict:
        from engine import SamplingParams

        engine = request.app.state.engine
        engine.check_ready()
        params = SamplingParams(temperature=0, max_tokens=body.max_tokens)
        try:
            stream = await engine.add_request(body.prompt, params)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        final = None
        async for output in stream:
            final = output
        completion = final.outputs[0]
        return {"text": completion.text, "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason}

    return router
