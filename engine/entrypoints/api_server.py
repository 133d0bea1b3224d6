"""The OpenAI-compatible HTTP server: a FastAPI app over one `AsyncEngine`.

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``GET /v1/plugins``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``POST /pooling``. `build_app` makes the app; `run_server` serves it with uvicorn
until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.entrypoints import serving
from engine.entrypoints.async_engine import AsyncEngine, EngineUnavailableError
from engine.entrypoints.chat import ChatTemplateError, render_chat
from engine.entrypoints.errors import APIError, json_response, validation_error
from engine.entrypoints.middleware import APIKeyMiddleware, BodyLimitMiddleware
from engine.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    PoolingRequest,
)

logger = logging.getLogger("engine.serve")

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


@dataclass
class ServerSettings:
    """What `engine serve` was asked for."""

    model_name: str  # the name clients use in "model"
    model_aliases: tuple[str, ...] = ()  # other names accepted for it (the folder path)
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    io_processor_plugin: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_timeout: float = 10.0  # seconds in-flight requests get on SIGTERM
    llm_kwargs: dict[str, Any] = field(default_factory=dict)


class ServerState:
    """The app's shared state: the engine, the settings, and what startup built."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine  # set by build_app
        self.io_processor: Any = None
        self.token_texts: serving.TokenTexts | None = None
        self.created = int(time.time())
        self.on_failure: Callable[[], None] | None = None  # set by run_server

    def check_model(self, name: str | None) -> None:
        if name is None or name == self.settings.model_name or name in self.settings.model_aliases:
            return
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def require_task(self, task: str) -> None:
        """400 naming the model when it does not serve `task` ("generate", "embed")."""
        engine = self.engine.llm.llm_engine
        if task not in engine.supported_tasks:
            what = {"generate": "generate text", "embed": "make embeddings"}.get(task, task)
            raise APIError(400, f"the model {self.settings.model_name!r} does not {what} "
                                f"(it serves: {', '.join(engine.supported_tasks)})",
                           param="model")

    @property
    def tokenizer(self) -> Any:
        return self.engine.llm.llm_engine.tokenizer


def build_llm(settings: ServerSettings, state: ServerState) -> Callable[[], Any]:
    """The engine factory run in the engine thread: the `LLM`, then the IO
    processor the server was started with."""

    def build() -> Any:
        from engine.io_processors import get_io_processor
        from engine.llm import LLM

        llm = LLM(**settings.llm_kwargs)
        try:
            state.token_texts = serving.TokenTexts(llm.get_tokenizer())
            # the one --io-processor-plugin names, else the model's config.json's
            state.io_processor = get_io_processor(llm.config, settings.io_processor_plugin)
        except BaseException:
            llm.shutdown()
            raise
        return llm

    return build


def build_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app over an `AsyncEngine` that builds ``LLM(**settings.llm_kwargs)``.
    The engine starts with the app (lifespan); routes answer 503 until it is ready."""
    state = ServerState(settings)
    state.engine = AsyncEngine(build_llm(settings, state))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start(lambda new_state: _engine_state_changed(state, new_state))
        yield
        await state.engine.shutdown()

    app = FastAPI(title="engine", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # outermost
    return app


def _engine_state_changed(state: ServerState, new_state: str) -> None:
    if new_state == "ready":
        s = state.settings
        print(f"engine serve: ready on http://{s.host}:{s.port} (model {s.model_name!r})",
              file=sys.stderr, flush=True)
    elif new_state == "failed" and state.on_failure is not None:
        state.on_failure()


# ------------------------------------------------------------------ errors


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return json_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return json_response(validation_error(list(exc.errors())))

    @app.exception_handler(EngineUnavailableError)
    async def unavailable(request: Request, exc: EngineUnavailableError) -> Response:
        return json_response(APIError(503, str(exc), code=f"engine_{exc.state}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return json_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return json_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`; cancel it (its streams abort, freeing their KV blocks) when
    the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return Response(status_code=499)  # nobody reads it


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except EngineUnavailableError as exc:
            error = APIError(503, str(exc), code=f"engine_{exc.state}")
            yield f"data: {json.dumps(error.payload())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ routes


def _add_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health() -> Response:
        body: dict[str, Any] = {"status": engine.state}
        if engine.ready:
            body.update(kv_cache_usage=engine.kv_cache_usage,
                        num_unfinished_requests=engine.num_unfinished_requests,
                        num_aborted_requests=engine.num_aborted)
            return JSONResponse(body)
        if engine.error is not None:
            body["error"] = str(engine.error)
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from engine.entrypoints.metrics import render_metrics

        content, content_type = render_metrics(engine)
        return Response(content, media_type=content_type)

    @app.get("/v1/plugins")
    async def plugins() -> Response:
        import registry

        return JSONResponse([record.to_json() for record in registry.discover()])

    @app.get("/v1/models")
    async def models() -> Response:
        engine.check_ready()
        model_config = engine.llm.config.model_config
        card = {"id": state.settings.model_name, "object": "model", "created": state.created,
                "owned_by": "engine", "root": model_config.model,
                "max_model_len": model_config.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine.check_ready()
        state.check_model(body.model)
        state.require_task("generate")
        for name, bad in (("echo", body.echo), ("suffix", body.suffix),
                          ("best_of", body.best_of not in (None, body.n))):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        params = serving.sampling_params(body, body.max_tokens, body.logprobs)
        streams = await serving.add_requests(engine, body.prompt, params, "prompt")
        name = state.settings.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(serving.stream_events(
                streams, chat=False, model=name, n=body.n, logprobs=body.logprobs,
                texts=state.token_texts, include_usage=include_usage))

        async def collect() -> Response:
            finals = await serving.final_outputs(streams)
            return JSONResponse(serving.completion_response(
                finals, name, body.n, body.logprobs, state.token_texts))

        return await _until_disconnect(request, collect())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine.check_ready()
        state.check_model(body.model)
        state.require_task("generate")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = serving.sampling_params(body, max_tokens, top_logprobs)
        prompt = _chat_prompt(state, body)
        streams = await serving.add_requests(engine, [prompt], params, "messages")
        name = state.settings.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(serving.stream_events(
                streams, chat=True, model=name, n=body.n, logprobs=top_logprobs,
                texts=state.token_texts, include_usage=include_usage))

        async def collect() -> Response:
            finals = await serving.final_outputs(streams)
            return JSONResponse(serving.chat_response(finals[0], name, top_logprobs,
                                                      state.token_texts))

        return await _until_disconnect(request, collect())

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        engine.check_ready()
        state.check_model(body.model)
        state.require_task("embed")
        try:
            vectors, token_ids = await engine.call(
                lambda llm: serving.embed_prompts(llm, body.input, body.dimensions))
        except ValueError as exc:
            raise APIError.bad_value(exc, "dimensions" if "dimensions" in str(exc)
                                     else "input") from None
        return JSONResponse(serving.embedding_response(
            vectors, sum(map(len, token_ids)), state.settings.model_name, body.encoding_format))

    @app.post("/pooling")
    async def pooling(body: PoolingRequest, request: Request) -> Response:
        engine.check_ready()
        state.check_model(body.model)
        return JSONResponse(await _pool(state, body))


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """The chat prompt's token ids, rendered with the request's or the model's template."""
    messages = []
    for i, message in enumerate(body.messages):
        try:
            item: dict[str, Any] = {"role": message.role, "content": message.text(i)}
        except ValueError as exc:
            raise APIError(400, str(exc), param=f"messages[{i}].content") from None
        if message.name is not None:
            item["name"] = message.name
        messages.append(item)
    tokenizer = state.tokenizer
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
               "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}
    extra = {k: v for k, v in (body.chat_template_kwargs or {}).items()
             if k not in ("messages", "add_generation_prompt", *special)}
    try:
        text = render_chat(body.chat_template or tokenizer.chat_template, messages,
                           add_generation_prompt=body.add_generation_prompt,
                           special_tokens=special, **extra)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    # the template already wrote the special tokens it wants
    return tokenizer.encode(text, add_special_tokens=False)


async def _pool(state: ServerState, body: PoolingRequest) -> dict[str, Any]:
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
    engine = state.engine

    async def pool(prompts: list[Any], pooling: Any) -> list[Any]:
        vectors, token_ids = await engine.call(lambda llm: serving.embed_prompts(
            llm, prompts, pooling.dimensions, pooling.normalize))
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


# ------------------------------------------------------------------ running


class GracefulServer(uvicorn.Server):
    """uvicorn, plus: requests still running when the shutdown grace period ends
    are aborted through the engine, so their streams end with an error event and
    ``[DONE]`` instead of a cut connection."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: Any = None) -> None:
        grace = self.state.settings.shutdown_timeout
        timer = asyncio.get_running_loop().call_later(
            grace, self.state.engine.abort_all,
            f"the server shut down; the request was aborted after {grace:g} s")
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run_server(settings: ServerSettings) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code (0 after a clean
    shutdown, 1 when the engine failed to start)."""
    app = build_app(settings)
    state: ServerState = app.state.server
    # uvicorn's own limit is a backstop: by then the engine has aborted what was left
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5)
    server = GracefulServer(config, state)
    failed = False

    def on_failure() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    state.on_failure = on_failure
    # uvicorn re-raises the signal it stopped for once it is done; our handlers make
    # that a no-op, so a requested shutdown ends with exit code 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        print(f"engine serve: error: the engine failed to start: {state.engine.error}",
              file=sys.stderr)
        return 1
    if not server.started:
        return 1  # could not bind (uvicorn logged why)
    return 0
