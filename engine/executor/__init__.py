"""Executors run the workers: in this process (`UniProcExecutor`) or one process
per tensor-parallel rank (`engine.executor.multiproc.MultiprocExecutor`).

The engine only ever calls `collective_rpc`, `execute_model`, `check_health` and
`shutdown`; what crosses an executor is plain picklable data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from engine.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

# the values of ``distributed_executor_backend``
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray", "external_launcher")


class ExecutorBase:
    """Runs one worker per rank and calls methods on all of them."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._init_executor()

    @staticmethod
    def get_class(config: Any) -> type[ExecutorBase]:
        """The executor of ``parallel_config.distributed_executor_backend``: "mp"
        (default) runs `UniProcExecutor` for one rank and `MultiprocExecutor` for
        more; "ray" runs `engine.executor.ray_executor.RayExecutor`;
        "external_launcher" runs
        `engine.executor.external_launcher.ExternalLauncherExecutor`."""
        backend = getattr(config.parallel_config, "distributed_executor_backend", None) or "mp"
        if backend == "ray":
            from engine.executor.ray_executor import RayExecutor

            return RayExecutor
        if backend == "external_launcher":
            from engine.executor.external_launcher import ExternalLauncherExecutor

            return ExternalLauncherExecutor
        if backend != "mp":
            raise ValueError(
                f"unknown distributed_executor_backend {backend!r}; "
                f"valid options are: {', '.join(DISTRIBUTED_EXECUTOR_BACKENDS)}"
            )
        if config.parallel_config.tensor_parallel_size > 1:
            from engine.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor
        return UniProcExecutor

    def _init_executor(self) -> None:
        raise NotImplementedError(f"{type(self).__qualname__}._init_executor")

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Call ``getattr(worker, method)(*args, **kwargs)`` on every rank (or
        ``method(worker, *args, **kwargs)`` for a function) and return the
        results in rank order."""
        raise NotImplementedError(f"{type(self).__qualname__}.collective_rpc")

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; returns rank 0's `ModelRunnerOutput`."""
        return self.collective_rpc("execute_model", (scheduler_output,))[0]

    def check_health(self) -> None:
        """Raise when a worker can no longer serve."""
        self.collective_rpc("check_health")

    def shutdown(self) -> None:
        """Stop the workers; idempotent."""


def build_worker(config: Any, rank: int = 0, distributed_init_method: str | None = None,
                 local_rank: int | None = None) -> Any:
    """The worker of ``config.parallel_config.worker_cls`` (a qualified name) for
    ``rank``; ``local_rank`` (the rank's index on its machine) defaults to ``rank``.

    Every executor builds its workers here, in the process that runs them, so
    whatever the worker class: the platform's `import_kernels` has run and the
    global random generators are seeded with ``model_config.seed`` before it is
    constructed."""
    from engine.platforms import current_platform
    from engine.utils import resolve_obj_by_qualname, set_random_seed

    name = config.parallel_config.worker_cls
    if name == "auto":
        raise ValueError(
            "parallel_config.worker_cls is still 'auto': the platform's "
            "check_and_update_config(config) must run before workers are built"
        )
    current_platform.import_kernels()  # at most once per process
    set_random_seed(config.model_config.seed)
    worker_cls = resolve_obj_by_qualname(name)
    return worker_cls(
        config=config, rank=rank, local_rank=rank if local_rank is None else local_rank,
        distributed_init_method=distributed_init_method,
    )


def call_worker(worker: Any, method: str | Callable[..., Any], args: tuple,
                kwargs: dict[str, Any]) -> Any:
    """``worker.method(*args, **kwargs)``, or ``method(worker, *args, **kwargs)``
    for a function: how every executor runs a `collective_rpc` call on a worker.
    Raises NotImplementedError naming the worker class when it has no `method`."""
    if callable(method):
        return method(worker, *args, **kwargs)
    fn = getattr(worker, method, None)
    if fn is None:
        raise NotImplementedError(
            f"worker class {type(worker).__qualname__} has no method {method!r}"
        )
    return fn(*args, **kwargs)


def rpc_name(method: str | Callable[..., Any]) -> str:
    """The name of a `collective_rpc` call, for error messages."""
    return method if isinstance(method, str) else getattr(method, "__name__", repr(method))


class UniProcExecutor(ExecutorBase):
    """The single worker lives in this process: calls are plain method calls."""

    def _init_executor(self) -> None:
        self.worker = build_worker(self.config)
        self._shut_down = False

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        if self._shut_down:
            raise RuntimeError("the executor was shut down")
        return [call_worker(self.worker, method, args, kwargs or {})]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def shutdown(self) -> None:
        if not self._shut_down:
            self._shut_down = True
            self.worker.shutdown()


__all__ = ["DISTRIBUTED_EXECUTOR_BACKENDS", "ExecutorBase", "UniProcExecutor", "build_worker",
           "call_worker", "rpc_name"]
