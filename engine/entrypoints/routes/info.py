"""``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``GET /v1/plugins``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints.async_engine import EngineUnavailableError
from engine.entrypoints.plugin_listing import plugin_rows

router = APIRouter()

# how long /health waits for the engine thread to confirm its workers are alive
# (it answers between two steps) before it reports what it knows
HEALTH_CHECK_TIMEOUT_S = 5.0


@router.get("/health")
async def health(request: Request) -> Response:
    """200 ``ready``; 200 ``degraded`` naming the failed replicas while a
    data-parallel server still serves from the others; 503 otherwise."""
    engine = request.app.state.server.engine
    if engine.ready:
        try:
            await asyncio.wait_for(engine.check_health(), HEALTH_CHECK_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineUnavailableError):
            pass  # a long step: the step loop itself notices a dead worker
        except Exception as exc:  # noqa: BLE001 - a dead worker: the engine has failed
            if not _failed_replicas(engine):
                return JSONResponse({"status": "failed", "error": str(exc)}, status_code=503)
    failed_replicas = _failed_replicas(engine)
    if failed_replicas:
        return JSONResponse({"status": "degraded", "failed_replicas": failed_replicas,
                             **_stats(engine)})
    body: dict[str, Any] = {"status": engine.state}
    if engine.ready:
        body.update(_stats(engine))
        return JSONResponse(body)
    if engine.error is not None:
        body["error"] = str(engine.error)
    return JSONResponse(body, status_code=503)


def _stats(engine: Any) -> dict[str, Any]:
    return {"kv_cache_usage": engine.kv_cache_usage,
            "num_unfinished_requests": engine.num_unfinished_requests,
            "num_aborted_requests": engine.num_aborted}


def _failed_replicas(engine: Any) -> list[dict[str, Any]]:
    """The failed replicas of a data-parallel engine that still serves from
    others (``[{"replica": i, "error": ...}]``); empty otherwise."""
    failed = getattr(engine, "failed_replicas", None)  # data parallel only
    if not failed or not engine.num_serving:
        return []
    return [{"replica": i, "error": error} for i, error in sorted(failed.items())]


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from engine.entrypoints.metrics import render_metrics

    content, content_type = render_metrics(request.app.state.server.engine)
    return Response(content, media_type=content_type)


@router.get("/v1/plugins")
async def plugins() -> Response:
    # the rows of `engine plugins list --json`, plus each plugin's effects here
    return JSONResponse(plugin_rows(with_effects=True))


@router.get("/v1/models")
async def models(request: Request) -> Response:
    state = request.app.state.server
    state.engine.check_ready()
    model_config = state.engine.engine.config.model_config
    card = {"id": state.settings.model_name, "object": "model", "created": state.created,
            "owned_by": "engine", "root": model_config.model,
            "max_model_len": model_config.max_model_len}
    cards = [card] + (state.loras.model_cards(state.created) if state.loras else [])
    return JSONResponse({"object": "list", "data": cards})
