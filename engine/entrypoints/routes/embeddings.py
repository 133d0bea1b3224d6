"""``POST /v1/embeddings``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints import serving
from engine.entrypoints.protocol import EmbeddingRequest

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    state = request.app.state.server
    state.admit(body.model, "embed")
    vectors, token_ids = await serving.embed(state.engine, body.input, body.dimensions)
    return JSONResponse(serving.embedding_response(
        vectors, sum(map(len, token_ids)), state.settings.model_name, body.encoding_format))
