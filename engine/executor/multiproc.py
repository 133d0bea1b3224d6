"""`MultiprocExecutor`: one worker process per tensor-parallel rank.

Each rank is a fresh interpreter (multiprocessing "spawn") that inherits the
environment (so `ENGINE_PLUGIN_DIRS`, `ENGINE_PLATFORM`, ... reach it), runs one
torch thread, loads the general plugins, resolves the worker class from
`config.parallel_config.worker_cls`, builds it and then serves RPCs over a pipe.

The parent never blocks on a pipe alone: it waits on every pipe together with
every process sentinel, so a worker that dies (killed, crashed, failed to start)
is noticed at once; the executor then stops the other workers and raises
`WorkerProcessError` naming the rank and the exit code.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

from engine.executor import ExecutorBase, build_worker, call_worker, rpc_name
from engine.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("engine.executor")

# after one rank reports an error, how long the others get to answer before the
# executor assumes they are stuck in a collective and shuts everything down
ERROR_GRACE_S = 10.0
SHUTDOWN_GRACE_S = 5.0


class WorkerProcessError(RuntimeError):
    """A worker process died or failed to start. `.rank` and `.exit_code` say
    which and how; `.remote_traceback` holds the worker's traceback text when
    it had the chance to send one."""

    def __init__(self, message: str, rank: int, exit_code: int | None = None,
                 remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exit_code = exit_code
        self.remote_traceback = remote_traceback


class _RemoteTraceback(Exception):
    """Carries a worker's traceback text as the `__cause__` of a re-raised error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


@dataclass
class _WorkerHandle:
    rank: int
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


# --------------------------------------------------------------------------
# worker process side


def _build_worker(config: Any, rank: int, init_method: str,
                  model_registrations: dict[str, dict[str, Any]] | None = None) -> Any:
    import torch

    torch.set_num_threads(1)
    import registry
    from engine.models.registry import apply_worker_registrations

    # general plugins first: they may register what the worker class needs
    registry.load_general_plugins()
    # then what the user's script registered before building the engine
    apply_worker_registrations(model_registrations)
    return build_worker(config, rank=rank, distributed_init_method=init_method)


def _send_error(conn: Connection, exc: BaseException) -> None:
    text = traceback.format_exc()
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        payload = None
    conn.send(("error", payload, text))


def _serve(worker: Any, conn: Connection) -> None:
    while True:
        try:
            method, args, kwargs, reply = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if method is None:  # shutdown
            stop = getattr(worker, "shutdown", None)
            if stop is not None:
                try:
                    stop()
                except Exception:
                    logger.exception("worker shutdown raised")
            conn.send(("ok", None))
            return
        try:
            result = call_worker(worker, method, args, kwargs)
            conn.send(("ok", result if reply else None))
        except Exception as exc:
            _send_error(conn, exc)


def _worker_main(config: Any, rank: int, init_method: str, conn: Connection,
                 model_registrations: dict[str, Any] | None = None) -> None:
    """Entry point of a worker process."""
    # Ctrl-C in a terminal reaches the whole process group: the driver decides what
    # it means (`engine chat` stops a reply), and stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = _build_worker(config, rank, init_method, model_registrations)
    except BaseException as exc:
        try:
            _send_error(conn, exc)
        finally:
            conn.close()
        _exit_now(1)
    conn.send(("ready", os.getpid()))
    try:
        _serve(worker, conn)
    finally:
        conn.close()
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch and friends, which takes
    seconds and does nothing useful once the worker has shut down. What a normal
    multiprocessing exit runs (finalizers that unlink named semaphores, ...) and
    the logging flush still run."""
    from multiprocessing import util

    exit_function = getattr(util, "_exit_function", None)
    if exit_function is not None:
        exit_function()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------
# parent side


def _stop_workers(handles: list[_WorkerHandle]) -> None:
    """Ask every live worker to shut down, then terminate / kill stragglers."""
    for h in handles:
        if h.process.is_alive():
            try:
                h.conn.send((None, (), {}, False))
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for h in handles:
        h.process.join(max(0.0, deadline - time.monotonic()))
    for h in handles:
        if h.process.is_alive():
            h.process.terminate()
            h.process.join(1.0)
        if h.process.is_alive():
            h.process.kill()
            h.process.join(1.0)
    for h in handles:
        h.conn.close()
    handles.clear()


class MultiprocExecutor(ExecutorBase):
    """Runs `config.parallel_config.tensor_parallel_size` workers, one process
    per rank, joined in one torch.distributed group by the workers themselves
    (`distributed_init_method` is a free `tcp://127.0.0.1:PORT`)."""

    def _init_executor(self) -> None:
        config = self.config
        world_size = config.parallel_config.tensor_parallel_size
        self.world_size = world_size
        self.distributed_init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._handles: list[_WorkerHandle] = []
        self._failure: str | None = None
        # stops the workers on shutdown(), garbage collection or interpreter exit
        self._finalizer = weakref.finalize(self, _stop_workers, self._handles)
        from engine.models.registry import registrations_for_workers

        # registrations made in the user's script reach every worker; a class the
        # workers could not import fails here, naming it, before anything starts
        registrations = registrations_for_workers(
            config.model_config.hf_config.get("architectures"))
        ctx = multiprocessing.get_context("spawn")
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_worker_main,
                args=(config, rank, self.distributed_init_method, child_conn, registrations),
                name=f"EngineWorker-TP{rank}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            self._handles.append(_WorkerHandle(rank, process, parent_conn))
        try:
            self._collect("startup", grace_s=0.0)
        except BaseException:
            self._fail("startup did not complete")
            raise
        logger.info("started %d worker processes (%s)", world_size,
                    ", ".join(str(h.process.pid) for h in self._handles))

    # -- RPC --------------------------------------------------------------

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Call `method` on the worker of every rank and return the results in
        rank order. `method` is a worker method name, or a picklable function
        called as `method(worker, *args, **kwargs)`.

        An exception in a worker is re-raised here (same type when it pickles)
        with the worker's traceback as its cause. A worker that dies raises
        `WorkerProcessError` and shuts the executor down.
        """
        return self._rpc(method, args, kwargs or {}, reply_rank=None)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's output is returned (the others'
        outputs are not sent back)."""
        return self._rpc("execute_model", (scheduler_output,), {}, reply_rank=0)[0]

    def _rpc(self, method: str | Callable[..., Any], args: tuple, kwargs: dict[str, Any],
             reply_rank: int | None) -> list[Any]:
        self._ensure_running()
        name = rpc_name(method)
        for h in self._handles:
            reply = reply_rank is None or h.rank == reply_rank
            try:
                h.conn.send((method, args, kwargs, reply))
            except (OSError, ValueError):
                pass  # a dead worker is reported by _collect through its sentinel
        try:
            return self._collect(name)
        except KeyboardInterrupt:
            # the workers are mid-call: their late answers would be read as the
            # answers to the next call, so this executor cannot go on
            self._fail(f"interrupted during {name!r}")
            raise

    def _collect(self, what: str, grace_s: float = ERROR_GRACE_S) -> list[Any]:
        """Wait for one message from every rank, watching the process sentinels.
        After a rank reports an error the others get `grace_s` to answer; the
        lowest failing rank's error is raised."""
        results: list[Any] = [None] * len(self._handles)
        pending = {h.conn: h for h in self._handles}
        sentinels = {h.process.sentinel: h for h in self._handles}
        errors: dict[int, tuple[_WorkerHandle, bytes | None, str]] = {}
        deadline = None
        while pending:
            waitables = list(pending) + [s for s, h in sentinels.items() if h.conn in pending]
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(waitables, timeout)
            if not ready:  # the other ranks did not answer after an error: stuck
                stuck = ", ".join(str(h.rank) for h in pending.values())
                self._fail(f"ranks {stuck} did not answer after rank {min(errors)} failed")
                break
            for obj in ready:
                h = pending.get(obj) or sentinels[obj]
                if h.conn not in pending:
                    continue
                if obj is h.process.sentinel and h.conn.poll():
                    continue  # it answered before exiting: read the answer first
                message = self._receive(h) if obj is h.conn else None
                if message is None:
                    self._died(h, what)
                pending.pop(h.conn)
                status, *payload = message
                if status == "error":
                    errors[h.rank] = (h, payload[0], payload[1])
                    if deadline is None:
                        deadline = time.monotonic() + grace_s
                elif status in ("ok", "ready"):
                    results[h.rank] = payload[0]
        if errors:
            self._raise_remote(what, *errors[min(errors)])
        return results

    def _receive(self, h: _WorkerHandle) -> tuple | None:
        try:
            return h.conn.recv()
        except (EOFError, OSError):
            return None

    def _died(self, h: _WorkerHandle, what: str) -> NoReturn:
        h.process.join(1.0)
        code = h.process.exitcode
        message = (
            f"engine worker process rank {h.rank} (pid {h.process.pid}) died with "
            f"{_describe_exit(code)} during {what!r}; the other workers were shut down"
        )
        if what == "startup":
            message += (
                ". Its own error is on stderr above. Worker processes are spawned: a "
                "script that builds the engine must do so under `if __name__ == '__main__':`"
            )
        self._fail(message)
        raise WorkerProcessError(message, rank=h.rank, exit_code=code)

    def _raise_remote(self, what: str, h: _WorkerHandle, payload: bytes | None,
                      text: str) -> NoReturn:
        if what == "startup":
            h.process.join(2.0)  # it exits on its own right after reporting
            self._fail(f"worker rank {h.rank} failed to start")
            raise WorkerProcessError(
                f"engine worker process rank {h.rank} failed to start:\n{text}",
                rank=h.rank, exit_code=h.process.exitcode, remote_traceback=text,
            )
        exc: BaseException | None = pickle.loads(payload) if payload is not None else None
        if not isinstance(exc, Exception):
            exc = RuntimeError(f"worker rank {h.rank} raised in {what!r}")
        exc.add_note(f"(raised in engine worker process rank {h.rank} during {what!r})")
        raise exc from _RemoteTraceback(text)

    # -- lifecycle --------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Stop every worker at once: after a failure the survivors may be stuck
        in a collective waiting for the lost rank, so there is no polite way."""
        if self._failure is None:
            self._failure = reason
        for h in self._handles:
            if h.process.is_alive():
                h.process.terminate()
        self.shutdown()

    def _ensure_running(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the executor's workers are gone: {self._failure}")
        if not self._finalizer.alive:
            raise RuntimeError("the executor was shut down")

    def check_health(self) -> None:
        """Raise `WorkerProcessError` when a worker process is no longer running,
        or the worker's own error when its `check_health` raises."""
        self._ensure_running()
        for h in self._handles:
            if not h.process.is_alive():
                self._died(h, "check_health")
        self.collective_rpc("check_health")

    def shutdown(self) -> None:
        """Stop every worker process (idempotent; also runs at interpreter exit)."""
        self._finalizer()

    @property
    def worker_pids(self) -> list[int]:
        return [h.process.pid for h in self._handles]
