"""Workers: one per rank, each running the model on its device.

`WorkerBase` is the interface (docs/reference.md, "Worker interface"); `Worker` is
the default torch worker of the cpu and cuda platforms. Platforms and plugins subclass them.
"""

from engine.worker.worker import Worker
from engine.worker.worker_base import KVCacheSpec, WorkerBase

__all__ = ["KVCacheSpec", "Worker", "WorkerBase"]
