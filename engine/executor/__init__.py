"""Executors run the workers: in this process (`UniProcExecutor`) or one process
per tensor-parallel rank (`engine.executor.multiproc.MultiprocExecutor`), on a
Ray cluster (`engine.executor.ray_executor.RayExecutor`) or in the processes an
external launcher started (`engine.executor.external_launcher`).

The engine only ever calls `collective_rpc`, `execute_model`, `check_health` and
`shutdown`; what crosses an executor is plain picklable data. The contract and
the shared helpers live in `engine.executor.abstract`; `executor_class` picks the
executor for a config.
"""

from __future__ import annotations

from engine.config import EngineConfig
from engine.executor.abstract import (
    DISTRIBUTED_EXECUTOR_BACKENDS,
    ExecutorBase,
    build_worker,
    call_worker,
    rpc_name,
)
from engine.executor.uniproc import UniProcExecutor


def executor_class(config: EngineConfig) -> type[ExecutorBase]:
    """The executor of ``parallel_config.distributed_executor_backend``: "mp"
    (default) runs `UniProcExecutor` for one rank and `MultiprocExecutor` for
    more; "ray" runs `engine.executor.ray_executor.RayExecutor`;
    "external_launcher" runs
    `engine.executor.external_launcher.ExternalLauncherExecutor`. Raises
    ValueError for another backend."""
    # the other executors are imported only when chosen: Ray's is costly to import
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


__all__ = ["DISTRIBUTED_EXECUTOR_BACKENDS", "ExecutorBase", "UniProcExecutor", "build_worker",
           "call_worker", "executor_class", "rpc_name"]
