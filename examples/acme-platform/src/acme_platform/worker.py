"""`AcmeWorker`: the engine's torch worker with Acme's device setup.

The engine builds one per rank, in each worker process, from the qualified name
`AcmePlatform.check_and_update_config` put in ``config.parallel_config.worker_cls``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.worker import Worker


class AcmeWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        # A real device would open its runtime context here. The example leaves a
        # trace when ACME_TRACE_DIR is set, so that a test can see which processes
        # ran an Acme worker.
        trace_dir = os.environ.get("ACME_TRACE_DIR")
        if trace_dir:
            record = {"rank": self.rank, "pid": os.getpid(), "worker": type(self).__name__}
            Path(trace_dir, f"worker-{self.rank}-{os.getpid()}.json").write_text(
                json.dumps(record)
            )
