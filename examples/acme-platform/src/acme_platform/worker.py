"""`AcmeWorker`: the engine's torch worker with Acme's device setup.

The engine builds one per rank, in each worker process, from the qualified name
`AcmePlatform.check_and_update_config` put in ``config.parallel_config.worker_cls``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import acme_platform
from engine.worker import Worker


class AcmeWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        # A real device would open its runtime context here.
        self._write_trace()

    def shutdown(self) -> None:
        self._write_trace()
        super().shutdown()

    def _write_trace(self) -> None:
        # With ACME_TRACE_DIR set, each worker leaves a file saying which process
        # ran it and how often Acme's code paths ran there, so that a test can see
        # into every worker process.
        trace_dir = os.environ.get("ACME_TRACE_DIR")
        if not trace_dir:
            return
        record = {"rank": self.rank, "pid": os.getpid(), "worker": type(self).__name__,
                  "stats": acme_platform.STATS}
        Path(trace_dir, f"worker-{self.rank}-{os.getpid()}.json").write_text(json.dumps(record))
