"""Development routes, mounted only in dev mode (``engine serve --enable-dev-mode``
or ``ENGINE_SERVER_DEV_MODE=1``) and behind the API key like every route:
``POST /sleep?level=1|2``, ``POST /wake_up``, ``GET /is_sleeping``
(docs/sleep-and-warm-up.md). While the engine sleeps, generation and embedding
requests get 503 with code ``engine_sleeping``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints.errors import APIError

router = APIRouter()

DEV_MODE_ENV = "ENGINE_SERVER_DEV_MODE"


@router.post("/sleep")
async def sleep(request: Request, level: int = 1) -> Response:
    """Free the KV cache and the weights of every replica (the engine must be
    built with ``--enable-sleep-mode`` and have no request in flight)."""
    engine = request.app.state.server.engine
    engine.check_ready()
    try:
        await engine.call_all(lambda llm: llm.sleep(level))
    except ValueError as exc:
        raise APIError(400, str(exc), param="level" if "level" in str(exc) else None) from None
    return JSONResponse({"is_sleeping": True})


@router.post("/wake_up")
async def wake_up(request: Request) -> Response:
    """Bring every replica's weights and KV cache back."""
    engine = request.app.state.server.engine
    engine.check_ready()
    await engine.call_all(lambda llm: llm.wake_up())
    return JSONResponse({"is_sleeping": False})


@router.get("/is_sleeping")
async def is_sleeping(request: Request) -> Response:
    engine = request.app.state.server.engine
    engine.check_ready()
    states = await engine.call_all(lambda llm: llm.is_sleeping())
    return JSONResponse({"is_sleeping": any(states)})
