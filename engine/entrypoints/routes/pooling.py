"""``POST /pooling``: the IO-processor plugin's route."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints import serving
from engine.entrypoints.errors import APIError
from engine.entrypoints.protocol import PoolingRequest

router = APIRouter()


@router.post("/pooling")
async def pooling(body: PoolingRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model)
    return JSONResponse(await _pool(state, body))


async def _pool(state: Any, body: PoolingRequest) -> dict[str, Any]:
    from fastapi.encoders import jsonable_encoder

    from engine.io_processors import IOProcessorError, process_request_async
    from engine.outputs import EmbeddingOutput, EmbeddingRequestOutput
    from engine.pooling_params import PoolingParams

    processor = state.io_processor
    if processor is None:
        raise APIError(400, "this server has no IO processor: start it with "
                            "--io-processor-plugin NAME to serve /pooling")
    params = None
    if body.dimensions is not None or body.normalize is not None:
        try:
            params = PoolingParams(dimensions=body.dimensions, normalize=body.normalize)
        except ValueError as exc:
            raise APIError.bad_value(exc) from None

    async def pool(prompts: list[Any], pooling: Any) -> list[Any]:
        try:
            vectors, token_ids = await serving.embed(state.engine, prompts, pooling.dimensions,
                                                     pooling.normalize)
        except APIError as exc:
            if exc.param == "input":  # the prompts came from the plugin, out of `data`
                exc.param = "data"
            raise
        return [EmbeddingRequestOutput(request_id=str(i),
                                       prompt=p if isinstance(p, str) else None,
                                       prompt_token_ids=ids, outputs=EmbeddingOutput(v))
                for i, (p, ids, v) in enumerate(zip(prompts, token_ids, vectors, strict=True))]

    request_id = serving.new_id("pool")
    try:
        result = await process_request_async(processor, body.data, pool, params, request_id)
    except IOProcessorError as exc:
        if exc.stage in ("parse_data", "merge_pooling_params"):
            raise APIError(400, str(exc), param="data") from None
        raise APIError(500, str(exc), type="server_error") from None
    except ValueError as exc:
        raise APIError.bad_value(exc, "data") from None
    return {"id": request_id, "object": "pooling", "created": int(time.time()),
            "model": state.settings.model_name, "data": jsonable_encoder(result)}
