"""Small worker classes that the multi-process executor tests spawn.

They follow the worker constructor contract (`config`, `rank`, `local_rank`,
`distributed_init_method`) but run no model: each method exercises one thing the
executor must get right across processes.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from engine.distributed import parallel_state
from engine.worker import WorkerBase


class ToyWorker(WorkerBase):

    def init_device(self) -> None:
        parallel_state.init_distributed_environment(
            world_size=self.config.parallel_config.tensor_parallel_size,
            rank=self.rank,
            distributed_init_method=self.distributed_init_method,
            backend=self.config.parallel_config.distributed_backend or "gloo",
        )
        parallel_state.initialize_model_parallel(self.config.parallel_config.tensor_parallel_size)

    def describe(self) -> dict:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "marker": os.environ.get("TOY_WORKER_MARKER"),
            "plugin_marker": os.environ.get("TOY_PLUGIN_MARKER"),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        }

    def all_reduce_rank(self) -> float:
        """Sum of (rank + 1) over the ranks, through the platform's communicator."""
        t = torch.tensor([self.rank + 1.0])
        return parallel_state.tensor_model_parallel_all_reduce(t).item()

    def execute_model(self, scheduler_output):
        return {"rank": self.rank, "echo": scheduler_output}

    def raise_value_error(self, message: str) -> None:
        raise ValueError(message)

    def kill_rank_during_all_reduce(self, victim: int) -> float:
        """The victim dies by SIGKILL while the others wait for it in a collective."""
        if self.rank == victim:
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.all_reduce_rank()

    def shutdown(self) -> None:
        path = os.environ.get("TOY_WORKER_SHUTDOWN_DIR")
        if path:
            with open(os.path.join(path, f"rank{self.rank}"), "w") as f:
                f.write("bye")
        parallel_state.destroy_distributed_environment()


class FailingStartWorker(ToyWorker):
    """Rank 1 cannot start."""

    def __init__(self, config, rank, local_rank, distributed_init_method):
        super().__init__(config, rank, local_rank, distributed_init_method)
        if rank == 1:
            raise RuntimeError("toy device 1 is missing its firmware")
