"""`UniProcExecutor`: the single worker lives in this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.executor.abstract import ExecutorBase, build_worker, call_worker
from engine.step import ModelRunnerOutput, SchedulerOutput


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
