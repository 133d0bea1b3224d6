"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: adapters
added and removed while the server runs (vLLM's routes and bodies). Mounted only
with ``--allow-runtime-lora-updating``; behind the API key like every route."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from engine.entrypoints.errors import APIError

router = APIRouter()


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def _loras(request: Request):
    state = request.app.state.server
    state.engine.check_ready()
    return state


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    state = _loras(request)
    try:
        lora = state.loras.add(body.lora_name, body.lora_path)
    except ValueError as exc:
        raise APIError(400, str(exc), param="lora_name") from None
    try:  # load it now: a bad adapter is answered here, not by its first request
        await state.engine.call(lambda llm: llm.llm_engine.add_lora(lora))
    except ValueError as exc:
        state.loras.remove(lora.name)
        raise APIError(400, str(exc), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter {lora.name!r} added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    state = _loras(request)
    lora = state.loras.by_name.get(body.lora_name)
    if lora is None or body.lora_int_id not in (None, lora.int_id):
        raise APIError(404, f"the LoRA adapter {body.lora_name!r} cannot be found",
                       param="lora_name", code="model_not_found")
    state.loras.remove(lora.name)
    # every replica that loaded it lets it go (requests running with it finish)
    for engine in getattr(state.engine, "replicas", [state.engine]):
        if engine.ready:
            await engine.call(lambda llm: llm.llm_engine.remove_lora(lora.int_id))
    return PlainTextResponse(f"Success: LoRA adapter {lora.name!r} removed successfully.")
