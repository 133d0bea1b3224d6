"""`ExternalLauncherExecutor`: each process an outside launcher started is one rank.

Under ``torchrun --nproc-per-node N script.py`` every process runs the same
script and builds the same engine with ``tensor_parallel_size=N,
distributed_executor_backend="external_launcher"``. The executor builds only
this process's worker, with the rank, local rank and world size torchrun put in
the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), and the worker joins
torch.distributed with ``env://`` (``MASTER_ADDR``/``MASTER_PORT``).

Every process runs its own scheduler on the same requests, so every rank makes
the same schedule; only rank 0 samples, and its sampled tokens are broadcast to
the other ranks after each step, so every process returns the same outputs.
Results of other calls (memory sizes, cache layout, errors) are exchanged too,
so every rank takes the same decisions or raises the same way.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from typing import Any

from engine.executor import ExecutorBase, build_worker, call_worker, rpc_name
from engine.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("engine.executor")

_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ExternalLauncherExecutor(ExecutorBase):
    """This process's rank of a torchrun-launched (or similar) tensor-parallel group."""

    def _init_executor(self) -> None:
        missing = [name for name in _LAUNCHER_ENV if name not in os.environ]
        if missing:
            raise RuntimeError(
                "distributed_executor_backend='external_launcher' runs one rank per process "
                f"started by a launcher, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: start the script with "
                "`torchrun --nproc-per-node N script.py` (N = tensor_parallel_size)"
            )
        world_size = int(os.environ["WORLD_SIZE"])
        tp = self.config.parallel_config.tensor_parallel_size
        if world_size != tp:
            raise ValueError(
                f"tensor_parallel_size={tp} but the launcher started {world_size} processes "
                f"(WORLD_SIZE); they must be equal"
            )
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.world_size = world_size
        self.worker = build_worker(self.config, rank=self.rank, local_rank=self.local_rank,
                                   distributed_init_method="env://")
        self._object_group: Any = None
        self._shut_down = False

    # -- exchanging Python objects between the ranks -----------------------

    def _group(self) -> Any:
        """A gloo group over every rank for Python objects (the world group itself
        when it is gloo); None before torch.distributed is up or with one rank."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return None
        if self._object_group is None:
            # every rank reaches this point in the same call, so the group is
            # created collectively as torch requires
            if dist.get_backend() == "gloo":
                self._object_group = dist.group.WORLD
            else:
                self._object_group = dist.new_group(backend="gloo")
        return self._object_group

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Call `method` on this process's worker, then exchange the results with the
        other ranks: every process gets the results of all ranks in rank order.
        When a rank raises, every rank raises (its own exception, or a RuntimeError
        naming the failing rank and carrying its traceback)."""
        if self._shut_down:
            raise RuntimeError("the executor was shut down")
        kwargs = kwargs or {}
        name = rpc_name(method)
        error: BaseException | None = None
        try:
            outcome = (True, call_worker(self.worker, method, args, kwargs))
        except Exception as exc:
            error = exc
            outcome = (False, traceback.format_exc())
        group = self._group()
        if group is None:
            if error is not None:
                raise error
            return [outcome[1]]
        import torch.distributed as dist

        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, outcome, group=group)
        if error is not None:
            raise error
        for rank, (ok, value) in enumerate(outcomes):
            if not ok:
                raise RuntimeError(f"engine rank {rank} raised during {name!r}:\n{value}")
        return [value for _, value in outcomes]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run this rank's share of the step; every rank returns rank 0's sampled
        output (broadcast from rank 0)."""
        if self._shut_down:
            raise RuntimeError("the executor was shut down")
        error: BaseException | None = None
        try:
            output = self.worker.execute_model(scheduler_output)
        except Exception as exc:
            error, output = exc, None
        group = self._group()
        if group is None:
            if error is not None:
                raise error
            return output
        import torch.distributed as dist

        box = [(error is None, output if error is None else traceback.format_exc())]
        dist.broadcast_object_list(box, src=0, group=group)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise RuntimeError(f"engine rank 0 raised during 'execute_model':\n{value}")
        return value

    def check_health(self) -> None:
        """This rank's worker only: health checks are not collective."""
        self.worker.check_health()

    def shutdown(self) -> None:
        """Shut this rank's worker down and leave the process group the engine
        joined (a group the script made itself is left alone)."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            group = self._group()
            if group is not None:
                import torch.distributed as dist

                # no rank tears the group down while another still uses it
                dist.barrier(group=group)
            self.worker.shutdown()
        finally:
            self._object_group = None
            from engine.distributed import parallel_state

            parallel_state.destroy_distributed_environment()
