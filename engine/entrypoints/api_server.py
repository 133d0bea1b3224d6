"""The OpenAI-compatible HTTP server: a FastAPI app over one `AsyncEngine`.

Routes (one module each under `engine.entrypoints.routes`): ``GET /health``,
``GET /metrics``, ``GET /v1/models``, ``GET /v1/plugins``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``POST /pooling``.
`build_app` makes the app; `run_server` serves it with uvicorn until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from starlette.responses import Response

from engine.core.engine import EngineSleepingError, RequestFailedError
from engine.engine_args import EngineArgs
from engine.entrypoints import serving
from engine.entrypoints.async_engine import AsyncEngine, EngineUnavailableError
from engine.entrypoints.errors import APIError, json_response, validation_error
from engine.entrypoints.middleware import APIKeyMiddleware, BodyLimitMiddleware
from engine.entrypoints.route_plugins import mount_route_plugins
from engine.entrypoints.routes import include_builtin_routes
from engine.entrypoints.sockets import listen_or_report
from engine.structured_outputs import set_compile_time_limit
from engine.utils import first_line

logger = logging.getLogger("engine.serve")

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


@dataclass
class ServerSettings:
    """What `engine serve` was asked for."""

    model_name: str  # the name clients use in "model"
    model_aliases: tuple[str, ...] = ()  # other names accepted for it (the folder path)
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_timeout: float = 10.0  # seconds in-flight requests get on SIGTERM
    engine_args: EngineArgs = field(default_factory=EngineArgs)  # the engine to serve
    data_parallel_size: int = 1  # engine replicas behind this server
    # what runs each replica's workers, "mp" or "ray" (None: engine_args' own backend)
    data_parallel_backend: str | None = None
    route_plugins: tuple[str, ...] = ()  # --enable-route-plugin names
    dev_mode: bool = False  # --enable-dev-mode: /sleep, /wake_up, /is_sleeping
    lora_modules: tuple[tuple[str, str], ...] = ()  # --lora-modules (name, path)
    allow_runtime_lora_updating: bool = False  # mounts /v1/load_lora_adapter and unload


class ServerState:
    """The app's shared state: the engine, the settings, and what startup built."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine  # set by build_app
        self.io_processor: Any = None
        self.token_texts: serving.TokenTexts | None = None
        self.created = int(time.time())
        self.on_failure: Callable[[], None] | None = None  # set by run_server
        self.loras: Any = None  # engine.lora.serving.ServerLoRAs with --enable-lora
        if settings.engine_args.enable_lora:
            from engine.lora.resolver import LoRAResolvers
            from engine.lora.serving import ServerLoRAs

            self.loras = ServerLoRAs(settings.model_name, settings.lora_modules,
                                     LoRAResolvers.from_plugins())

    def admit(self, model: str | None, task: str | None = None) -> None:
        """Check a request before any work: the engine is ready (503), `model`
        is the served one (404), and the model serves `task` ("generate",
        "embed"; 400 naming the model)."""
        self.engine.check_ready()
        self.check_model(model)
        if task is not None:
            self.require_task(task)

    def check_model(self, name: str | None) -> None:
        if name is None or name == self.settings.model_name or name in self.settings.model_aliases:
            return
        if self.lora_request(name) is not None:
            return
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def lora_request(self, name: str | None) -> Any:
        """The LoRA adapter a request's ``model`` names (None: the base model)."""
        if self.loras is None or name is None:
            return None
        return self.loras.lookup(name)

    def served_name(self, name: str | None) -> str:
        """The ``model`` a response carries: the adapter's name, or the base model's."""
        return name if self.lora_request(name) is not None else self.settings.model_name

    def require_task(self, task: str) -> None:
        """400 naming the model when it does not serve `task` ("generate", "embed")."""
        supported = self.engine.engine.supported_tasks
        if task not in supported:
            what = {"generate": "generate text", "embed": "make embeddings"}.get(task, task)
            raise APIError(400, f"the model {self.settings.model_name!r} does not {what} "
                                f"(it serves: {', '.join(supported)})", param="model")


def build_llm(settings: ServerSettings, state: ServerState) -> Callable[[], Any]:
    """The engine factory run in the engine thread: the `LLM` (with the IO
    processor the server was started with)."""

    def build() -> Any:
        from engine.llm import LLM

        llm = LLM(**vars(settings.engine_args))
        if state.loras is not None:  # --lora-modules: a bad adapter fails the start
            for lora in state.loras.by_name.values():
                llm.llm_engine.add_lora(lora)
        state.token_texts = serving.TokenTexts(llm.get_tokenizer())
        # the one --io-processor-plugin names, else the model's config.json's
        state.io_processor = llm.io_processor
        return llm

    return build


def build_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app over an `AsyncEngine` that builds an `LLM` from
    ``settings.engine_args``.
    The engine starts with the app (lifespan); routes answer 503 until it is ready."""
    # a grammar compile past the request's limit is killed, not left running
    set_compile_time_limit(serving.STRUCTURED_CHECK_TIMEOUT)
    state = ServerState(settings)
    if settings.data_parallel_size > 1:
        from engine.entrypoints.data_parallel import DataParallelEngine

        state.engine = DataParallelEngine.from_settings(
            settings, lambda replica_settings: build_llm(replica_settings, state))
    else:
        state.engine = AsyncEngine(build_llm(settings, state))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start(lambda new_state: _engine_state_changed(state, new_state))
        yield
        await state.engine.shutdown()

    app = FastAPI(title="engine", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    app.state.engine = state.engine  # what route plugins program against
    _add_error_handlers(app)
    include_builtin_routes(app)
    if settings.dev_mode:
        from engine.entrypoints.routes.dev import router as dev_router

        app.include_router(dev_router)
    if settings.allow_runtime_lora_updating:
        from engine.entrypoints.routes.lora import router as lora_router

        app.include_router(lora_router)
    mount_route_plugins(app, settings.route_plugins)  # after the built-ins: clashes are refused
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
        return json_response(validation_error(list(exc.errors()),
                                              request.headers.get("content-type")))

    @app.exception_handler(EngineUnavailableError)
    async def unavailable(request: Request, exc: EngineUnavailableError) -> Response:
        return json_response(APIError(503, str(exc), code=f"engine_{exc.state}"))

    @app.exception_handler(EngineSleepingError)
    async def sleeping(request: Request, exc: EngineSleepingError) -> Response:
        return json_response(APIError(503, f"{exc} (POST /wake_up)", code="engine_sleeping"))

    @app.exception_handler(RequestFailedError)
    async def request_failed(request: Request, exc: RequestFailedError) -> Response:
        return json_response(APIError(500, str(exc), code="request_failed"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return json_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        # the traceback went to the log; the client gets one line
        return json_response(APIError(500, f"internal error: {type(exc).__name__}: "
                                           f"{first_line(str(exc))}"))


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


def run_server(settings: ServerSettings, sock: Any = None) -> int:
    """Serve until SIGTERM or SIGINT on `sock` (a listening socket from
    `engine.entrypoints.sockets.listen`; default: bound here first); returns the
    exit code (0 after a clean shutdown, 1 when the port cannot be listened on or
    the engine failed to start or, later, lost a worker)."""
    if sock is None:
        sock = listen_or_report(settings.host, settings.port)
        if sock is None:
            return 1
    sockets = [sock]
    settings.port = sock.getsockname()[1]  # the port the system picked for --port 0
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
        server.run(sockets=sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        engine = state.engine
        when = ("failed to start" if engine.failure_context is None
                else f"failed {engine.failure_context}")
        print(f"engine serve: error: the engine {when}: {type(engine.error).__name__}: "
              f"{engine.error}", file=sys.stderr)
        return 1
    if not server.started:
        return 1  # uvicorn could not start (it logged why)
    return 0
