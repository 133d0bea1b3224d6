"""`AsyncEngine`: one `LLMEngine` driven by a background thread, for asyncio servers.

Everything that touches the engine (building it, adding and aborting requests,
stepping, embedding) runs in one thread, the *engine thread*, so torch work never
blocks the event loop and the engine itself needs no locks. The event loop sends
work to the engine thread through a command queue; each step's outputs come back
with one ``loop.call_soon_threadsafe`` for all requests together, so requests that
arrive close together are batched into the same steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from engine.core.engine import LLMEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")

# while idle, how often the engine thread asks the workers whether they are alive
HEALTH_CHECK_INTERVAL_S = 1.0


class EngineUnavailableError(RuntimeError):
    """The engine is still starting, has stopped, or has failed; `state` says which."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


class _EngineDead(Exception):
    """Raised inside the engine thread when a health check fails: ends the loop."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RequestStream:
    """The outputs of one generation request, as an async iterator of
    `RequestOutput` snapshots; the last one has ``finished`` set.

    Iteration raises `EngineUnavailableError` when the engine stops or fails before
    the request finishes. Leaving a stream unfinished (``abort()``, or dropping it)
    aborts the request and frees its KV blocks.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._outputs = outputs
        # dropped without being finished or aborted (a handler that never started
        # streaming): abort it then, so its blocks are not held forever
        self._finalizer = weakref.finalize(self, engine.abort, request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        return self._take(await self._outputs.get())

    def take_ready(self) -> list[Any]:
        """Snapshots already delivered, without waiting (a slow reader catches up
        in one go)."""
        ready = []
        while not self.finished and not self._outputs.empty():
            ready.append(self._take(self._outputs.get_nowait()))
        return ready

    def _take(self, item: Any) -> Any:
        if isinstance(item, BaseException):
            self._done()
            raise item
        if item.finished:
            self._done()
        return item

    def _done(self) -> None:
        self.finished = True
        self._finalizer.detach()

    def abort(self) -> None:
        """Stop the request now unless it already finished (idempotent)."""
        if not self.finished:
            self._done()
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Owns one engine (built by ``build()`` in the engine thread) and runs its
    ``step()`` loop there.

    ``build`` returns an `engine.LLM`; its ``llm_engine`` is the `LLMEngine` that
    is stepped. `state` moves ``starting`` -> ``ready`` -> ``stopped``, or to
    ``failed`` (then `error` holds the exception).
    """

    def __init__(self, build: Callable[[], Any]) -> None:
        self.state = "starting"
        self.error: BaseException | None = None
        self.llm: Any = None
        self.num_aborted = 0  # requests aborted before they finished
        self.ready_at: float | None = None  # time.monotonic() when it became ready
        # when the engine failed after it was ready: how long it had served, busy or idle
        self.failure_context: str | None = None
        self._build = build
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = False
        self._live: set[str] = set()  # engine thread only: requests in the engine
        self._queues: dict[str, asyncio.Queue] = {}  # event loop only: open streams
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._on_state: Callable[[str], None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, on_state_change: Callable[[str], None] | None = None) -> None:
        """Start the engine thread (call from the event loop). `on_state_change`
        is called on the loop with the new state when the engine becomes
        ``ready`` or ``failed``, or stops."""
        self._loop = asyncio.get_running_loop()
        self._on_state = on_state_change
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every unfinished request, stop the engine thread and shut the
        engine down (idempotent)."""
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def check_ready(self) -> None:
        """Raise `EngineUnavailableError` unless requests can be served now."""
        if self.state == "ready" and not self._stop:
            return
        if self.state == "starting":
            raise EngineUnavailableError("starting", "the server is starting; retry shortly")
        if self.state == "failed":
            raise EngineUnavailableError("failed", f"the engine failed: {self.error}")
        raise EngineUnavailableError("stopped", "the server is shutting down")

    # ------------------------------------------------------------ requests

    async def add_request(self, prompt: str | list[int], params: Any,
                          request_id: str | None = None) -> RequestStream:
        """Queue a generation request; returns its `RequestStream`.

        Raises ValueError (the engine's message) when the request cannot be
        served, `EngineUnavailableError` when the engine is not ready.
        """
        self.check_ready()
        request_id = request_id or uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = outputs
        try:
            await self.call(lambda llm: self._add(llm, prompt, params, request_id))
        except BaseException:
            # also on cancellation: the add may still run, and must be undone
            self._queues.pop(request_id, None)
            self.abort(request_id)
            raise
        return RequestStream(self, request_id, outputs)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks (safe from any thread; a finished
        or unknown id is ignored)."""
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._queues.pop, request_id, None)
        except RuntimeError:  # the loop closed meanwhile
            return
        self._send(lambda llm: self._abort(llm, request_id), None)

    def abort_all(self, message: str) -> None:
        """Abort every open request (call on the event loop): each stream ends with
        `EngineUnavailableError` carrying `message`, and the engine frees their blocks."""
        error = EngineUnavailableError("stopped", message)
        for request_id, outputs in self._queues.items():
            outputs.put_nowait(error)
            self._send(lambda llm, rid=request_id: self._abort(llm, rid), None)
        self._queues.clear()

    async def check_health(self) -> None:
        """Ask the workers whether they are alive (between two steps). A dead
        worker raises its error here and fails the engine (`state` becomes
        ``failed``, open requests end)."""
        self.check_ready()

        def check(llm: Any) -> None:
            try:
                llm.llm_engine.check_health()
            except Exception as exc:
                raise _EngineDead(exc) from exc

        await self.call(check)

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(llm)`` in the engine thread between two steps; returns its
        result or raises its exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(fn, future)
        return await asyncio.wrap_future(future)

    async def call_all(self, fn: Callable[[Any], T]) -> list[T]:
        """`call` on every replica (one here); results in replica order."""
        return [await self.call(fn)]

    # ------------------------------------------------------------ introspection

    @property
    def engine(self) -> LLMEngine:
        """The `LLMEngine` (once ready). Its read-only members (`supported_tasks`,
        `tokenizer`, `config`, `tokenize_prompt`, `embedding_token_ids`) are safe
        from any thread; everything else goes through `call`."""
        return self.llm.llm_engine

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV-cache blocks held by requests (0 when none run)."""
        return self.llm.llm_engine.kv_cache_usage() if self.llm is not None else 0.0

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------ engine thread

    def _send(self, fn: Callable[[Any], Any], future: concurrent.futures.Future | None) -> None:
        self._commands.put((fn, future))
        self._wakeup.set()

    def _add(self, llm: Any, prompt: Any, params: Any, request_id: str) -> None:
        llm.llm_engine.add_request(prompt, params, request_id)
        self._live.add(request_id)

    def _abort(self, llm: Any, request_id: str) -> None:
        if request_id in self._live:
            self._live.discard(request_id)
            llm.llm_engine.abort_request(request_id)
            self.num_aborted += 1

    def _run(self) -> None:
        try:
            self.llm = self._build()
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits
            logger.exception("the engine failed to start")
            self._finish("failed", exc)
            return
        self.ready_at = time.monotonic()
        self._set_state("ready")
        try:
            self._loop_steps()
        except BaseException as exc:  # noqa: BLE001 - every open request learns of it
            busy = len(self._live)
            self.failure_context = (
                f"after {time.monotonic() - self.ready_at:.1f} s of serving, "
                + (f"while running {busy} request(s)" if busy else "while idle")
            )
            logger.exception("the engine failed %s", self.failure_context)
            self._finish("failed", exc)
        else:
            self._finish("stopped", None)

    def _loop_steps(self) -> None:
        from engine.core.engine import RequestFailedError

        engine = self.llm.llm_engine
        while True:
            self._wakeup.clear()
            self._run_commands()
            if self._stop:
                return
            if not self._live:
                # idle: a worker that dies now must still be noticed (and reported)
                if not self._wakeup.wait(HEALTH_CHECK_INTERVAL_S):
                    engine.check_health()
                continue
            try:
                outputs = engine.step()
            except RequestFailedError as exc:  # those requests end; the engine goes on
                self._live.difference_update(exc.request_ids)
                self._loop.call_soon_threadsafe(self._fail_requests, exc)
                continue
            if outputs:
                for out in outputs:
                    if out.finished:
                        self._live.discard(out.request_id)
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(self.llm)
            except _EngineDead as dead:  # a health check found a dead worker
                if future is not None:
                    future.set_exception(dead.cause)
                raise dead.cause from None
            except Exception as exc:
                if future is None:
                    logger.exception("an engine command failed")
                else:
                    future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)

    def _finish(self, state: str, error: BaseException | None) -> None:
        """Leave the loop: abort what is left, answer pending commands, shut down."""
        self.error = error
        for request_id in list(self._live):
            try:
                self._abort(self.llm, request_id)
            except Exception:  # noqa: BLE001 - the engine is going away anyway
                logger.debug("abort of %s during shutdown failed", request_id, exc_info=True)
        if self.llm is not None:
            try:
                self.llm.shutdown()
            except Exception:  # noqa: BLE001
                logger.exception("engine shutdown failed")
        self.state = state
        message = f"the engine failed: {error}" if error else "the server is shutting down"
        unavailable = EngineUnavailableError(state, message)
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(unavailable)
        self._set_state(state, unavailable)

    def _set_state(self, state: str, error: EngineUnavailableError | None = None) -> None:
        self.state = state
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._state_changed, state, error)
        except RuntimeError:  # the loop closed meanwhile
            pass

    # ------------------------------------------------------------ event loop

    def _deliver(self, outputs: list[Any]) -> None:
        for out in outputs:
            stream = self._queues.get(out.request_id)
            if stream is None:
                continue
            stream.put_nowait(out)
            if out.finished:
                del self._queues[out.request_id]

    def _fail_requests(self, error: BaseException) -> None:
        for request_id in getattr(error, "request_ids", ()):
            stream = self._queues.pop(request_id, None)
            if stream is not None:
                stream.put_nowait(error)

    def _state_changed(self, state: str, error: EngineUnavailableError | None) -> None:
        if error is not None:
            for stream in self._queues.values():
                stream.put_nowait(error)
            self._queues.clear()
        if self._on_state is not None:
            self._on_state(state)
