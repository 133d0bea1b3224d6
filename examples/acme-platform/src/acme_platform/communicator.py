"""Acme's device communicator: the tensor-parallel collectives.

The example keeps torch.distributed's (gloo on the CPU) and counts its all-reduces;
a real device would call its own collective library here (and could set up its
communicator from ``self.group`` and ``self.device`` in ``__init__``)."""

from __future__ import annotations

import acme_platform
from engine.distributed import DeviceCommunicatorBase


class AcmeCommunicator(DeviceCommunicatorBase):
    def all_reduce(self, input_):
        acme_platform.STATS["all_reduce_calls"] += 1
        return super().all_reduce(input_)
